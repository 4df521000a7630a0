"""RLHF with PPO: the policy samples replies to training-split prompts, the frozen reward
model scores them, a per-token KL penalty to the frozen SFT model keeps the policy close
(adaptive coefficient, Ziegler-style), and the clipped PPO objective with a value head
and GAE (gamma 1, lambda 0.95) updates the policy.

One optimizer step of the shared loop is one PPO minibatch. Every `steps_per_rollout`
steps the stage draws a fresh batch of rollouts with the current policy, through the
serving engine (synchronous, on the policy's live weights, its KV pool kept for the
whole stage) at temperature 1 with top_k=0 and top_p=1 (truncated sampling makes the KL
estimate meaningless: the sampled distribution is no longer the policy's).

With `ptx_coef` > 0 each minibatch also carries the language-model loss on a batch of
demonstrations (InstructGPT's PPO-ptx, with the SFT conversations where InstructGPT used
pretraining text): it anchors what the policy already does right, so PPO can take larger
steps without the drift that a KL penalty alone lets through.

With `algo="grpo"` (Shao et al. 2024) there is no value head: each prompt gets a group of
`samples_per_prompt` replies, a reply's advantage is its reward's z-score within its
group, (r - mean) / std, on every one of its tokens, and the KL to the reference is a
term of the loss (the k3 estimator per token, weight `grpo_beta`) instead of a per-token
reward penalty.

The prompts are the built-in task problems, or any token prompts (`prompt_ids`) with a
`scorer`: a function of (prompt indices, reply texts, finished flags) -> rewards, such as a
user's Python reward function over their own prompt file (training/own_data.py). Without
a scorer the reward model scores the replies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gpt.chat import chat_prompt_ids, chat_stop_ids
from gpt.model import GPT
from gpt.tokenizer import SolTokenizer
from server.engine.api import SamplingParams
from server.engine.engine import Engine
from server.engine.offline import generate
from training.batching import pad_right, rank_weight, step_generator
from training.data.tasks import Problem
from training.decoding import MAX_NUM_SEQS, training_engine
from training.distributed import current, mean_across_ranks
from training.heads import PolicyWithValue, RewardModel
from training.loop import LoopConfig
from training.lora_training import rollout_adapters
from training.ppo import (
    AdaptiveKLController,
    entropy_from_logits,
    gae,
    kl_rewards,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from training.stages.sft import SFTConfig, SFTStage, assistant_lm_loss


@dataclass
class RLHFConfig:
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(lr=2e-5, warmup_steps=4, batch_size=32,
                                                                min_lr_ratio=1.0, weight_decay=0.0,
                                                                log_every=4))
    rollouts: int = 64                # replies per rollout batch per rank
    samples_per_prompt: int = 1       # replies drawn per prompt; > 1 centres scores per prompt
    # Prompts drawn per prompt kept (with samples_per_prompt > 1): the batch keeps the
    # prompts whose replies differ first, since a group of identical replies has a
    # centred score of zero and teaches nothing (DAPO's dynamic sampling, judged by the
    # replies themselves rather than a verifier). 1 = keep every prompt drawn.
    prompt_oversample: int = 1
    ppo_epochs: int = 2
    max_new_tokens: int = 16
    temperature: float = 1.0
    init_kl_coef: float = 0.05
    target_kl: float | None = 1.0     # nats per reply; None = fixed coefficient
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    missing_eos_penalty: float = 1.0  # subtracted from the (normalised) score of an unfinished reply
    ptx_coef: float = 0.0             # weight of the demonstrations' LM loss in each minibatch (0 = off)
    ptx_batch_size: int = 64          # demonstrations per minibatch
    algo: str = "ppo"                 # "ppo" (value head, GAE) or "grpo" (group z-scores, no value head)
    grpo_beta: float = 0.04           # GRPO: weight of the per-token KL to the reference in the loss

    @property
    def steps_per_rollout(self) -> int:
        if self.rollouts % self.samples_per_prompt:
            raise ValueError(f"rollouts {self.rollouts} must be a multiple of samples_per_prompt")
        if self.rollouts % self.loop.batch_size:
            raise ValueError(f"rollouts {self.rollouts} must be a multiple of the minibatch {self.loop.batch_size}")
        return self.ppo_epochs * self.rollouts // self.loop.batch_size


# (prompt indices, reply texts, whether each reply finished) -> one reward per reply
Scorer = Callable[[list[int], list[str], list[bool]], list[float]]


@dataclass
class Rollout:
    """One batch of replies and everything PPO needs about them."""

    seqs: torch.Tensor          # (B, T) prompt + reply, right-padded
    index: torch.Tensor         # (B, R) positions whose logits predict reply token j
    targets: torch.Tensor       # (B, R) reply token ids
    mask: torch.Tensor          # (B, R) 1 on real reply tokens
    logp: torch.Tensor          # (B, R) policy log-probs at rollout time
    values: torch.Tensor        # (B, R)
    advantages: torch.Tensor    # (B, R) whitened
    returns: torch.Tensor       # (B, R)
    stats: dict[str, float]
    ref_logp: torch.Tensor | None = None    # (B, R) the reference's log-probs (GRPO's KL term)


def reply_logprobs(logits: torch.Tensor, index: torch.Tensor, targets: torch.Tensor, temperature: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of `targets` under the logits at `index` (and those logits), at the
    temperature the rollouts were sampled with."""
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
    picked = logits[rows, index].float() / temperature
    logp = torch.log_softmax(picked, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    return logp, picked


def varied_groups_first(replies: list[list[int]], group: int, keep: int) -> tuple[list[int], list[bool]]:
    """Which replies a rollout batch keeps when more prompts were drawn than it holds.
    `replies` come in consecutive groups of `group` per prompt; the first `keep` groups
    are taken, those whose replies differ first (in drawing order), then the others.
    Returns the kept reply indices and, per drawn group, whether its replies differ."""
    n_groups = len(replies) // group
    varied = [len({tuple(replies[i]) for i in range(j * group, (j + 1) * group)}) > 1 for j in range(n_groups)]
    order = sorted(range(n_groups), key=lambda j: not varied[j])[:keep]   # stable: drawing order kept
    return [i for j in order for i in range(j * group, (j + 1) * group)], varied


def gather_rollout(rollout: Rollout, pad: int, world: int) -> Rollout:
    """Every rank's rollout batch, in rank order, on every rank (their stats averaged):
    rank r's replies are rows r*B..(r+1)*B-1, as the same replies are in one process
    drawing the whole batch (the draws and sampling seeds are sliced that way)."""
    if world <= 1:
        return rollout
    import torch.distributed as dist

    tensors = {f.name: getattr(rollout, f.name) for f in dataclasses.fields(Rollout)
               if isinstance(getattr(rollout, f.name), torch.Tensor)}
    gathered: list[dict | None] = [None] * world
    dist.all_gather_object(gathered, {k: v.cpu() for k, v in tensors.items()})
    device = rollout.seqs.device
    out: dict = {}
    for name in tensors:
        parts = [g[name] for g in gathered]
        width = max(p.shape[1] for p in parts)
        fill = pad if name in ("seqs", "targets") else 0
        out[name] = torch.cat([F.pad(p, (0, width - p.shape[1]), value=fill) for p in parts]).to(device)
    stats = mean_across_ranks(rollout.stats, current())
    return Rollout(**out, stats=stats)


class RLHFStage:
    name = "rlhf"

    def __init__(self, policy: PolicyWithValue, reference: GPT, reward_model: RewardModel | None,
                 tokenizer: SolTokenizer, problems: list[Problem] | None, cfg: RLHFConfig,
                 device: torch.device | str = "cpu",
                 demonstrations: list[list[dict[str, str]]] | None = None,
                 prompt_ids: list[list[int]] | None = None, scorer: Scorer | None = None) -> None:
        self.policy = policy
        self.reference = reference.eval().requires_grad_(False)
        if reward_model is None and scorer is None:
            raise ValueError("RLHF needs a reward model or a scorer")
        self.reward_model = reward_model.eval().requires_grad_(False) if reward_model is not None else None
        self.scorer = scorer
        self.tokenizer = tokenizer
        self.problems = problems
        if problems is not None:
            self.prompts = [chat_prompt_ids(tokenizer, [{"role": "user", "content": p.prompt}]) for p in problems]
        elif prompt_ids:
            self.prompts = prompt_ids
        else:
            raise ValueError("RLHF needs prompts: task problems or prompt token ids")
        if cfg.algo not in ("ppo", "grpo"):
            raise ValueError(f"algo must be 'ppo' or 'grpo', got {cfg.algo!r}")
        if cfg.algo == "grpo" and cfg.samples_per_prompt < 2:
            raise ValueError(f"GRPO needs a group of at least 2 replies per prompt, got {cfg.samples_per_prompt}")
        self.cfg = cfg
        self.device = torch.device(device)
        if cfg.algo == "grpo":
            # No value head in GRPO: frozen, so that DDP does not wait for its gradients.
            policy.head.requires_grad_(False)
        if cfg.prompt_oversample < 1 or (cfg.prompt_oversample > 1 and cfg.samples_per_prompt < 2):
            raise ValueError("prompt_oversample must be 1, or above 1 with samples_per_prompt of 2 or more "
                             f"(got {cfg.prompt_oversample} and {cfg.samples_per_prompt})")
        self.kl = AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon)
        self.ptx: SFTStage | None = None
        if cfg.ptx_coef > 0:
            if not demonstrations:
                raise ValueError("ptx_coef > 0 needs demonstrations (the SFT conversations)")
            # Its own seed stream, so that the demonstrations drawn do not mirror the rollout draws.
            loop = LoopConfig(batch_size=cfg.ptx_batch_size, seed=cfg.loop.seed + 5)
            self.ptx = SFTStage(tokenizer, demonstrations, SFTConfig(loop), device)
        # The RM's raw scale is arbitrary: scores are normalised with the mean and std of
        # the first rollout batch (the SFT policy's replies), as in Ziegler et al.
        self.score_mean: float | None = None
        self.score_std: float | None = None
        self.rollout: Rollout | None = None
        self.rollout_iteration = -1
        self.engine: Engine | None = None     # made at the first rollout, kept for the stage
        self.history: list[dict[str, float]] = []

    # --- resumable state (the loop stores it as JSON) -----------------------------------------
    def state_dict(self) -> dict[str, float | None]:
        return {"kl_coef": self.kl.value, "score_mean": self.score_mean, "score_std": self.score_std}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.kl.value = state["kl_coef"]
            self.score_mean, self.score_std = state["score_mean"], state["score_std"]

    def tensor_state(self) -> dict:
        """The current rollout batch: a run resumed mid-way through its minibatches trains
        on the replies the weights at the rollout's start sampled, as the uninterrupted
        run did (sampling again with the updated weights would give other replies). Under
        DDP every rank holds the whole gathered batch, so rank 0's copy serves all."""
        if self.rollout is None:
            return {}
        fields = {f.name: getattr(self.rollout, f.name) for f in dataclasses.fields(Rollout)}
        return {"iteration": self.rollout_iteration,
                "rollout": {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in fields.items()
                            if v is not None}}

    def load_tensor_state(self, state: dict) -> None:
        if state:
            fields = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in state["rollout"].items()}
            self.rollout, self.rollout_iteration = Rollout(**fields), int(state["iteration"])
            self.history.append({"iteration": self.rollout_iteration, **self.rollout.stats})

    # --- rollouts ---------------------------------------------------------------------------
    @torch.no_grad()
    def make_rollout(self, iteration: int, rank: int, world: int) -> Rollout:
        cfg = self.cfg
        g = step_generator(cfg.loop.seed, iteration, 7)
        k = cfg.samples_per_prompt
        n_prompts = cfg.rollouts // k
        drawn = n_prompts * cfg.prompt_oversample
        picks = torch.randint(0, len(self.prompts), (drawn * world,), generator=g)
        picks = picks[rank * drawn:(rank + 1) * drawn].repeat_interleave(k).tolist()
        prompts = [self.prompts[i] for i in picks]
        seeds = [(cfg.loop.seed * 1_000_003 + iteration) * 65_537 + rank * drawn * k + i for i in range(len(picks))]
        self.policy.eval()
        engine = self.rollout_engine(len(picks))
        params = [SamplingParams(temperature=cfg.temperature, top_k=0, top_p=1.0, max_tokens=cfg.max_new_tokens,
                                 seed=seed) for seed in seeds]
        choices = [out.choices[0] for out in generate(engine, prompts, params, chat_stop_ids(self.tokenizer),
                                                      adapters=rollout_adapters(self.policy.gpt, len(prompts)))]
        replies = [c.token_ids or [self.tokenizer.end_of_turn_id] for c in choices]
        keep, varied = varied_groups_first(replies, k, n_prompts)
        picks, prompts, replies = [picks[i] for i in keep], [prompts[i] for i in keep], [replies[i] for i in keep]
        finished_kept = [choices[i].stopped for i in keep]
        seqs = pad_right([p + r for p, r in zip(prompts, replies, strict=True)], self.tokenizer.pad_id)
        index = pad_right([list(range(len(p) - 1, len(p) - 1 + len(r))) for p, r in zip(prompts, replies,
                                                                                         strict=True)], 0)
        targets = pad_right(replies, self.tokenizer.pad_id)
        mask = pad_right([[1] * len(r) for r in replies], 0).float()
        seqs, index, targets, mask = (t.to(self.device) for t in (seqs, index, targets, mask))

        # The sampled tokens' log-probs are recomputed by the training forward, not taken
        # from the engine's events: PPO's ratio divides the log-probs of the forward that
        # is differentiated (the training graph: full-sequence attention, the training
        # precision) by these, and only the same computation makes that ratio 1 before
        # the first update. The engine's come from its inference-mode paged path (bf16 on
        # a GPU), which carries no graph and differs by rounding; on CPU they agree within
        # 1e-4 (tests/training/test_rollout_engine.py).
        logits, values_all = self.policy(seqs)
        logp, _ = reply_logprobs(logits, index, targets, cfg.temperature)
        ref_logp, _ = reply_logprobs(self.reference(seqs), index, targets, cfg.temperature)
        rows = torch.arange(seqs.shape[0], device=self.device)[:, None]
        values = values_all[rows, index] * mask
        last = torch.tensor([len(p) + len(r) - 1 for p, r in zip(prompts, replies, strict=True)], device=self.device)
        starts = torch.tensor([len(p) for p in prompts], device=self.device)
        texts = [self.tokenizer.decode([t for t in r if t != self.tokenizer.end_of_turn_id]) for r in replies]
        if self.scorer is not None:
            raw = torch.tensor(self.scorer(picks, texts, finished_kept), dtype=torch.float32, device=self.device)
        else:
            raw = self.reward_model(seqs, last, starts).float()
        if cfg.algo == "grpo":
            return self._grpo_rollout(seqs, index, targets, mask, logp, ref_logp, raw, picks, texts, keep, varied,
                                      finished_kept)
        centred = raw
        if k > 1:
            # Several replies to one prompt: their mean is the prompt's baseline, so that the
            # advantage says which reply is better, not which prompt is easier (RLOO-style
            # variance reduction in front of the value head and GAE).
            centred = raw - raw.view(-1, k).mean(1).repeat_interleave(k)
        if self.score_mean is None:
            self.score_mean, self.score_std = centred.mean().item(), max(centred.std().item(), 1e-3)
        score = (centred - self.score_mean) / self.score_std
        finished = torch.tensor(finished_kept, dtype=torch.bool, device=self.device)
        score = torch.where(finished, score, score - cfg.missing_eos_penalty)
        logp, ref_logp = logp * mask, ref_logp * mask
        rewards, kl = kl_rewards(score, logp, ref_logp, mask, self.kl.value)
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)
        kl_per_reply = kl.sum(1).mean().item()
        stats = {
            "score": raw.mean().item(),
            "score_normalised": score.mean().item(),
            "kl": kl_per_reply,
            "kl_coef": self.kl.value,
            "reply_tokens": mask.sum(1).mean().item(),
            "finished": finished.float().mean().item(),
            **self._group_stats(picks, texts, keep, varied),
            "value_mean": masked_mean(values, mask).item(),
        }
        # Every rank updates its coefficient with the mean over all ranks, so all hold the
        # same one (and rank 0's saved state is every rank's).
        self.kl.update(mean_across_ranks({"kl": kl_per_reply}, current())["kl"], cfg.rollouts * world)
        return Rollout(seqs, index, targets, mask, logp, values, advantages, returns, stats)

    def _group_stats(self, picks: list[int], texts: list[str], keep: list[int], varied: list[bool]
                     ) -> dict[str, float]:
        k = self.cfg.samples_per_prompt
        stats = {"varied_groups_drawn": sum(varied) / len(varied),
                 "varied_groups_kept": sum(varied[i // k] for i in keep[::k]) / (len(keep) // k)}
        if self.problems is not None:
            correct = [self.problems[i].check(t) for i, t in zip(picks, texts, strict=True)]
            stats["sample_accuracy"] = sum(correct) / len(correct)
        return stats

    def _grpo_rollout(self, seqs: torch.Tensor, index: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                      logp: torch.Tensor, ref_logp: torch.Tensor, raw: torch.Tensor, picks: list[int],
                      texts: list[str], keep: list[int], varied: list[bool], finished: list[bool]) -> Rollout:
        """Group-relative advantages: each reply's reward as a z-score among the replies
        to its prompt, the same on every reply token; no values, no returns."""
        groups = raw.view(-1, self.cfg.samples_per_prompt)
        # A group whose rewards all agree has no preferred reply: its advantages are 0.
        z = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)
        advantages = z.flatten()[:, None] * mask
        logp, ref_logp = logp * mask, ref_logp * mask
        zeros = torch.zeros_like(mask)
        stats = {"score": raw.mean().item(), "score_std_in_group": groups.std(1).mean().item(),
                 "kl": ((logp - ref_logp) * mask).sum(1).mean().item(), "kl_coef": self.cfg.grpo_beta,
                 "reply_tokens": mask.sum(1).mean().item(), "finished": sum(finished) / len(finished),
                 **self._group_stats(picks, texts, keep, varied)}
        return Rollout(seqs, index, targets, mask, logp, zeros, advantages, zeros, stats, ref_logp)

    def rollout_engine(self, rows: int) -> Engine:
        """The policy's engine: made once, on the policy's live weights (no copy), with a
        KV pool reused by every rollout. Its cached prefix blocks hold keys and values the
        previous weights computed, so they are dropped before each rollout."""
        if self.engine is None:
            longest = max(len(p) for p in self.prompts) + self.cfg.max_new_tokens
            self.engine = training_engine(self.policy.gpt, longest, min(rows, MAX_NUM_SEQS))
        else:
            self.engine.reset_prefix_cache()
        return self.engine

    # --- the loop's interface ---------------------------------------------------------------
    def micro_batch(self, step: int, micro: int, rank: int, world: int
                    ) -> tuple[Rollout, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        cfg = self.cfg
        per = cfg.steps_per_rollout
        iteration, within = divmod(step, per)
        if self.rollout_iteration != iteration or self.rollout is None:
            rollout = self.make_rollout(iteration, rank, world)
            self.rollout = gather_rollout(rollout, self.tokenizer.pad_id, world)
            self.rollout_iteration = iteration
            self.history.append({"iteration": iteration, **self.rollout.stats})
            self.policy.train()
        # Minibatches are drawn from the whole (gathered) rollout batch of every rank, and
        # each rank trains on its slice: one process with `world` times the rollouts and
        # the minibatch trains on the same rows in the same steps.
        size = cfg.loop.batch_size
        minibatches = cfg.rollouts // size
        epoch, mb = divmod(within, minibatches)
        order = torch.randperm(cfg.rollouts * world, generator=step_generator(cfg.loop.seed, iteration, 100 + epoch))
        step_rows = order[mb * size * world:(mb + 1) * size * world]
        rows = step_rows[rank * size:(rank + 1) * size].to(self.device)
        tokens = self.rollout.mask.sum(1).cpu()
        weight = rank_weight([tokens[step_rows[r * size:(r + 1) * size]].sum().item() for r in range(world)], rank)
        demos = self.ptx.micro_batch(step, micro, rank, world) if self.ptx else None
        return self.rollout, rows, demos, weight

    def loss(self, model: nn.Module, batch: tuple[Rollout, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]
             ) -> tuple[torch.Tensor, dict[str, float]]:
        ro, rows, demos, *rest = batch
        weight = rest[0] if rest else 1.0     # this rank's share of the minibatch's reply tokens
        cfg = self.cfg
        seqs = ro.seqs[rows]
        n = seqs.shape[0]
        if demos is not None:
            # One forward for rollouts and demonstrations together (DDP expects one per
            # backward); right padding leaves every real position's logits as they were.
            inputs = demos[0]
            width = max(seqs.shape[1], inputs.shape[1])
            seqs = torch.cat([F.pad(seqs, (0, width - seqs.shape[1]), value=self.tokenizer.pad_id),
                              F.pad(inputs, (0, width - inputs.shape[1]), value=self.tokenizer.pad_id)])
        logits_all, values_all = model(seqs)
        logits, values_all = logits_all[:n], values_all[:n]
        index, targets, mask = ro.index[rows], ro.targets[rows], ro.mask[rows]
        logp, picked = reply_logprobs(logits, index, targets, cfg.temperature)
        sel = torch.arange(rows.numel(), device=rows.device)[:, None]
        values = values_all[sel, index]
        pg = policy_loss(logp, ro.logp[rows], ro.advantages[rows], mask, cfg.cliprange)
        extra: dict[str, float] = {}
        if cfg.algo == "grpo":
            # k3 = exp(ref - new) - (ref - new) - 1: non-negative, unbiased for KL(new || ref).
            to_ref = ro.ref_logp[rows] - logp
            kl_term = masked_mean(torch.exp(to_ref) - to_ref - 1, mask)
            vf = vf_clip = torch.zeros((), device=seqs.device)
            loss = (pg.loss + cfg.grpo_beta * kl_term) * weight
            extra["kl_loss"] = kl_term.item()
        else:
            vf, vf_clip = value_loss(values, ro.values[rows], ro.returns[rows], mask, cfg.cliprange_value)
            loss = (pg.loss + cfg.vf_coef * vf) * weight
        if demos is not None:
            ptx = assistant_lm_loss(logits_all[n:, :demos[0].shape[1]], demos[1])
            loss = loss + cfg.ptx_coef * ptx * demos[2]
            extra["ptx_loss"] = ptx.item()
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(picked), mask).item()
        return loss, {**extra, "loss": loss.item(), "policy_loss": pg.loss.item(), "value_loss": vf.item(),
                      "clip_fraction": pg.clip_fraction.item(), "value_clip_fraction": vf_clip.item(),
                      "approx_kl": pg.approx_kl.item(), "entropy": entropy,
                      "tokens": float(mask.sum().item()), **ro.stats}
