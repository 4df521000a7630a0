"""Fixed-size KV blocks: allocation, reference counts and the prefix cache.

Each full block is keyed by a hash of (its parent block's hash, its token ids), so a key
names the whole prefix up to the block's end; a sequence's first block hangs off its cache
salt (its LoRA adapter's name and version; none for the base model), so keys and values
computed under one adapter are never served to another. A lookup walks a prompt's full blocks from
the start and, on a hash hit, also compares the stored parent hash and token ids: a hash
collision can cost a miss, never a wrong answer. Freed blocks keep their key and wait in
an LRU list; a later prompt with the same prefix revives them, and allocation evicts the
least recently freed one only when no never-cached block is left.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence as Seq

from server.engine.blocks import blocks_for
from server.engine.sequence import Sequence

BlockKey = tuple[int | None, tuple[int, ...]]


def block_hash(parent: int | None, tokens: Seq[int]) -> int:
    # Python's hash of a tuple of ints is not salted per process, and keys never leave
    # this process anyway.
    return hash((parent, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.keys: list[BlockKey | None] = [None] * num_blocks
        self.hashes: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}                   # hash -> block id
        self.free_plain: deque[int] = deque(range(num_blocks))
        self.free_cached: OrderedDict[int, None] = OrderedDict()   # LRU: oldest first
        # Per sequence: the chain hash of each of its full, registered blocks.
        self.seq_hashes: dict[int, list[int]] = {}
        self.queries = 0          # prompt tokens looked up
        self.hits = 0             # of those, found in the cache

    # --- accounting -----------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free_plain) + len(self.free_cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    # --- prefix cache ---------------------------------------------------------------------
    def _match(self, token_ids: Seq[int], root: int | None = None) -> tuple[list[int], list[int]]:
        """Blocks (and their chain hashes) holding a prefix of `token_ids` computed under the
        same `root` (the sequence's cache salt: its adapter version, None for the base
        model). The last token is never served from the cache: its logits are needed to
        sample the next one."""
        blocks: list[int] = []
        hashes: list[int] = []
        parent: int | None = root
        bs = self.block_size
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            h = block_hash(parent, tokens)
            b = self.cached.get(h)
            if b is None or self.keys[b] != (parent, tokens):
                break
            blocks.append(b)
            hashes.append(h)
            parent = h
        return blocks, hashes

    def _take_free(self) -> int:
        if self.free_plain:
            return self.free_plain.popleft()
        b, _ = self.free_cached.popitem(last=False)
        h = self.hashes[b]
        if h is not None and self.cached.get(h) == b:
            del self.cached[h]
        self.keys[b] = None
        self.hashes[b] = None
        return b

    # --- sequences ------------------------------------------------------------------------
    def allocate(self, seq: Sequence) -> int | None:
        """Give `seq` blocks for all its tokens, reusing cached prefix blocks. Returns the
        number of tokens served from the cache, or None (nothing changed) when the free
        blocks do not suffice."""
        assert not seq.block_table, "sequence already holds blocks"
        hit_blocks, hit_hashes = self._match(seq.token_ids, seq.cache_salt)
        new_needed = self.blocks_for(seq.num_tokens) - len(hit_blocks)
        revived = sum(1 for b in hit_blocks if self.ref_counts[b] == 0)
        if self.num_free - revived < new_needed:
            return None
        for b in hit_blocks:
            if self.ref_counts[b] == 0:
                del self.free_cached[b]
            self.ref_counts[b] += 1
        table = list(hit_blocks)
        for _ in range(new_needed):
            b = self._take_free()
            self.ref_counts[b] = 1
            table.append(b)
        seq.block_table = table
        seq.num_computed = len(hit_blocks) * self.block_size
        seq.num_hashed_blocks = len(hit_blocks)
        self.seq_hashes[seq.seq_id] = hit_hashes
        self.queries += seq.num_tokens
        self.hits += seq.num_computed
        return seq.num_computed

    def ensure_capacity(self, seq: Sequence, num_tokens: int) -> bool:
        """Make room for `num_tokens` tokens in `seq`; False (nothing changed) if the
        free blocks do not suffice."""
        extra = self.blocks_for(num_tokens) - len(seq.block_table)
        if extra <= 0:
            return True
        if extra > self.num_free:
            return False
        for _ in range(extra):
            b = self._take_free()
            self.ref_counts[b] = 1
            seq.block_table.append(b)
        return True

    def register_full_blocks(self, seq: Sequence) -> None:
        """Offer the blocks that `seq` has completely computed to the prefix cache."""
        bs = self.block_size
        hashes = self.seq_hashes.setdefault(seq.seq_id, [])
        full = seq.num_computed // bs
        for i in range(seq.num_hashed_blocks, full):
            parent = hashes[i - 1] if i else seq.cache_salt
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(parent, tokens)
            hashes.append(h)
            b = seq.block_table[i]
            if h not in self.cached and self.hashes[b] is None:
                self.cached[h] = b
                self.hashes[b] = h
                self.keys[b] = (parent, tokens)
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def free(self, seq: Sequence) -> None:
        """Release the blocks of `seq` (finish, abort or preemption). Blocks are released
        tail first so that, among equally old ones, a prefix outlives its continuation."""
        for b in reversed(seq.block_table):
            self.ref_counts[b] -= 1
            assert self.ref_counts[b] >= 0, f"block {b} released twice"
            if self.ref_counts[b] == 0:
                if self.hashes[b] is not None:
                    self.free_cached[b] = None
                else:
                    self.free_plain.append(b)
        seq.block_table = []
        seq.num_computed = 0
        seq.num_hashed_blocks = 0
        self.seq_hashes.pop(seq.seq_id, None)

    def reset_prefix_cache(self) -> None:
        for b in list(self.free_cached):
            self.keys[b] = None
            self.hashes[b] = None
            self.free_plain.append(b)
        self.free_cached.clear()
        self.cached = {h: b for h, b in self.cached.items() if self.ref_counts[b] > 0}

    def check_whole(self) -> None:
        """Raise AssertionError unless every block is free with no references: the state
        the pool must return to when no request is in flight."""
        leaked = [b for b, r in enumerate(self.ref_counts) if r]
        assert not leaked, f"blocks still referenced: {leaked[:10]}"
        assert self.num_free == self.num_blocks, f"{self.num_blocks - self.num_free} blocks missing"
        assert len(set(self.free_plain) | set(self.free_cached)) == self.num_blocks, "a block is free twice"
        assert not self.seq_hashes, "sequence hash chains left behind"
