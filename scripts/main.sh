#!/usr/bin/env bash
# The main job, end to end on the embedded defaults (no external service):
#   set up .venv/ -> sol pipeline (tokenizer, pretrain, SFT, reward model, RLHF, evaluation,
#   report) -> sol serve (embedded SQLite ledger) -> an API key -> a chat over gRPC through
#   the CLI -> the metered usage -> a graceful shutdown.
# Knobs: SOL_HOME (default ~/.sol), SOL_PRESET (default cpu; tiny takes ~3 minutes),
# SOL_MODEL (default demo), SOL_PORT / SOL_HTTP_PORT / SOL_METRICS_PORT (default 50051 / 8000 / 9400).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

export SOL_HOME=${SOL_HOME:-$HOME/.sol}
preset=${SOL_PRESET:-cpu}
name=${SOL_MODEL:-demo}
port=${SOL_PORT:-50051}
metrics_port=${SOL_METRICS_PORT:-9400}
http_port=${SOL_HTTP_PORT:-8000}
export SOL_TARGET=127.0.0.1:$port
sol=.venv/bin/sol
mkdir -p "$SOL_HOME"

echo "== 1. training: sol pipeline --preset $preset --name $name"
$sol pipeline --preset "$preset" --name "$name"
$sol models list

echo "== 2. serving: sol serve on $SOL_TARGET (OpenAI-compatible HTTP API and playground on http://127.0.0.1:$http_port/, metrics on :$metrics_port), log in $SOL_HOME/serve.log"
$sol serve --host 127.0.0.1 --port "$port" --http-port "$http_port" --metrics-port "$metrics_port" >"$SOL_HOME/serve.log" 2>&1 &
server=$!
stop_server() {
  if kill -0 "$server" 2>/dev/null; then
    kill -TERM "$server"          # graceful: readiness off, in-flight requests finish, ledger flushed
    wait "$server" || true
  fi
}
trap stop_server EXIT

key=$($sol keys create --name demo-user --wait 300)
export SOL_API_KEY=$key
$sol prices set "$name" --prompt-per-1k 0.5 --completion-per-1k 1.5 --cached-discount 0.5

echo "== 3. a chat over gRPC with the RLHF model ($name:rlhf); usage is shown after each answer"
# One question per chat, in the task families' own wording: the demo model learned
# single-turn conversations of those tasks and nothing else. The repeated question shows
# prompt tokens served from the prefix cache (its first 16-token block).
for question in "What is 48 + 27?" "Reverse the letters: r a d i o" "Is 12321 a palindrome? Answer yes or no." \
  "Which is larger, 58 or 85?" "Is 12321 a palindrome? Answer yes or no."; do
  echo "> $question"
  printf '%s\n' "$question" | $sol chat --wait 300 --model "$name:rlhf" --max-tokens 48 --temperature 0
done

echo "== 4. one completion as JSON (usage and cost included)"
$sol complete --wait 300 --model "$name:sft" --max-tokens 24 --temperature 0 --json "Sort in ascending order: 9, 2, 7"

echo "== 5. the same model through the OpenAI-compatible HTTP API (the openai SDK; curl works too)"
.venv/bin/python - "$http_port" "$key" "$name:rlhf" <<'PY'
import sys

from openai import OpenAI

port, key, model = sys.argv[1:]
client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key)
reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is 48 + 27?"}],
                                       max_tokens=24, temperature=0)
usage = reply.usage
print(f"{reply.choices[0].message.content!r} ({reply.choices[0].finish_reason}; {usage.prompt_tokens} prompt, "
      f"{usage.prompt_tokens_details.cached_tokens} cached, {usage.completion_tokens} completion tokens)")
PY
echo "   playground: http://127.0.0.1:$http_port/ (paste the API key)"

echo "== 6. the ledger: usage per key and model"
$sol usage

stop_server
trap - EXIT
echo "== done: checkpoints in $SOL_HOME/registry/$name, the training report beside them; server log $SOL_HOME/serve.log"
