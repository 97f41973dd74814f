#!/usr/bin/env bash
# GPU smoke test (run by hand on a CUDA machine; about 6-10 minutes on one GPU):
# convert the built-in SmolLM2-135M-Instruct, then `linconv bench` it against the original on CUDA
# in bf16, eager and with the compiled decode step. Prints the bench tables, then one JSON line with the headline figures.
#   bash tests/benchmarks/gpu_smoke.sh [OUTDIR]
set -euo pipefail
OUT="${1:-$(mktemp -d -t linconv-gpu-smoke.XXXXXX)}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"  # the Python whose environment has linconv (and its `linconv` command on PATH)

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)"

time linconv convert "$OUT/ckpt" --device cuda --dtype bf16 --overwrite

# A 2 GiB cap on device memory so the original hits its limit within seconds; the linearized model
# should reach the 256K cap. Contexts up to 16K show the decode curve.
time linconv bench "$OUT/ckpt" --device cuda --dtype bf16 \
    --memory-budget 2 --max-len-cap 262144 --trial-timeout 60 --granularity 4096 \
    --contexts 256,2048,8192,16384 --decode-tokens 32 --repeats 2 --ppl-tokens 65536 \
    --json "$OUT/bench.json" --plot "$OUT/bench.png"

# The compiled decode step (torch.compile of the one-token step, both models alike) on the same
# contexts, then compiled vs eager greedy tokens in bf16 (fused kernels round differently, so the
# agreement is reported rather than required).
time linconv bench "$OUT/ckpt" --device cuda --dtype bf16 --tasks speed --compile \
    --contexts 256,2048,8192,16384 --decode-tokens 64 --repeats 2 --json "$OUT/bench_compiled.json"
"$PY" - "$OUT/ckpt" > "$OUT/compiled_tokens.json" <<'PYEOF'
import json, sys, torch, linconv
from linconv.generate import generate
model, tok = linconv.load(sys.argv[1], dtype=torch.bfloat16, device="cuda")
ids = tok("The history of the city begins with")["input_ids"]
eager = generate(model, ids, max_new_tokens=300, stop_token_ids=()).tokens[0]  # crosses a group boundary
compiled = generate(model, ids, max_new_tokens=300, stop_token_ids=(), compile=True).tokens[0]
same = next((i for i, (a, b) in enumerate(zip(eager, compiled)) if a != b), len(eager))
print(json.dumps({"compiled_equals_eager_tokens": same}))
PYEOF

"$PY" - "$OUT/bench.json" "$OUT/bench_compiled.json" "$OUT/compiled_tokens.json" <<'PYEOF'
import json, sys
d = json.load(open(sys.argv[1]))
c = json.load(open(sys.argv[2]))["speed"]
ppl, ml, sp = d["perplexity"], d["max_length"], d["speed"]
pick = lambda role: {p["context"]: round(p["decode_tokens_per_s"], 1) for p in sp[role]}
print(json.dumps({
    "status": d["status"],
    "ppl": {r: round(ppl[r]["perplexity"], 2) for r in ("original", "linearized")},
    "maxlen_generate": {r: [ml["generate"][r]["max_length"], ml["generate"][r]["bound"]] for r in ("original", "linearized")},
    "maxlen_forward": {r: [ml["forward"][r]["max_length"], ml["forward"][r]["bound"]] for r in ("original", "linearized")},
    "decode_tok_s": {r: pick(r) for r in ("original", "linearized")},
    "compiled_decode_tok_s": {r: {p["context"]: round(p["decode_tokens_per_s"], 1) for p in c[r]} for r in ("original", "linearized")},
    **json.load(open(sys.argv[3])),
    "leaks": d["leakage"]["leaks"],
}))
PYEOF
echo "files: $OUT/bench.json $OUT/bench.png"
