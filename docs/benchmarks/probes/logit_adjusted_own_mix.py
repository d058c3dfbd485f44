"""Probe, not product (docs/benchmarks.md, section 1): does logit-adjusted local training let the
global model with a hospital's own label mix beat the hospital alone? Validation parts only.

Run from the project root, with the corpus in ../shared: `python docs/benchmarks/probes/logit_adjusted_own_mix.py SEED 8`.
One JSON line per seed: [accuracy, macro-F1] on the hospitals' own validation parts (logit_adjusted_own_mix.jsonl).
"""
import sys, json
from dataclasses import replace
import torch, torch.nn.functional as F
import medtune.train as T
from medtune.run_config import settings_from_run_config, resolve_run_config
from medtune.experiments.sweep import read_sweep as load_sweep
from medtune.experiments.baselines import splits
from medtune.data import train_test_split
from medtune.backbone import load_backbone
from medtune.features import record_inputs
from medtune.label_prior import initial_model
from medtune.label_mix import label_mix, apply_label_mix
from medtune.evaluation import predict_logits
from medtune.metrics import score_logits, pool

seed = int(sys.argv[1]); eps = float(sys.argv[2])
sweep = load_sweep("medical_abstracts")
ov = {**sweep.run_config, "seed": seed, "epsilon": eps}
S = settings_from_run_config(resolve_run_config(sweep.scenario, ov))
bb = load_backbone(S.model.backbone, S.model.num_layers, "cpu")
pad = bb.tokenizer.pad_token_id
from pathlib import Path; cache = Path("/tmp/probe/cache")
H = []
for sp in splits(S):
    fit, val = train_test_split(sp.train, 0.2, S.seed + 1)
    H.append(dict(name=sp.name, fit=record_inputs(bb, S.model, fit, cache), val=record_inputs(bb, S.model, val, cache),
                  mix=label_mix([r.label for r in fit], len(S.data.labels))))
L = len(S.data.labels)
ADJ = {"bias": None}
orig = T._batch_loss
def adjusted(model, batch, device):
    labels = batch["labels"].to(device)
    logits = model(batch["inputs"].to(device), batch["attention_mask"].to(device))
    if ADJ["bias"] is not None:
        logits = logits + ADJ["bias"]
    return F.cross_entropy(logits, labels, reduction="sum") / max(1, labels.shape[0])
T._batch_loss = adjusted

def score(model, h, mix=None):
    lg = predict_logits(model, h["val"], pad, torch.device("cpu"))
    if mix is not None: lg = apply_label_mix(lg, mix)
    return score_logits(lg, h["val"].labels, S.data.labels)

out = {}
R = S.federation.rounds
# local alone
ev = []
for i, h in enumerate(H):
    ADJ["bias"] = None
    m = initial_model(bb, S.model, S.data, seed=S.seed)
    cfg = replace(S.train, epochs=S.train.epochs * R)
    led = T.new_ledger(S.privacy, len(h["fit"]), cfg, rounds=1)
    T.train_local(m, h["fit"], led, cfg, pad, seed=seed * 1000 + i, progress=False)
    ev.append(score(m, h))
out["local"] = pool(ev)
for mode in ("plain", "adjusted"):
    g = initial_model(bb, S.model, S.data, seed=S.seed)
    state = g.exchanged_state()
    leds = [T.new_ledger(S.privacy, len(h["fit"]), S.train, rounds=R) for h in H]
    opt = [None] * len(H)
    for r in range(R):
        ups, ws = [], []
        for i, h in enumerate(H):
            m = initial_model(bb, S.model, S.data, seed=S.seed); m.load_exchanged_state(state)
            ADJ["bias"] = torch.log(torch.tensor(h["mix"], dtype=torch.float32)) if mode == "adjusted" else None
            res = T.train_local(m, h["fit"], leds[i], S.train, pad, seed=seed * 1000 + 100 * r + i, progress=False, optimizer_state=opt[i])
            opt[i] = res.optimizer_state
            ups.append(m.exchanged_state()); ws.append(res.examples)
        state = {k: sum(w * u[k] for w, u in zip(ws, ups)) / sum(ws) for k in ups[0]}
    g.load_exchanged_state(state)
    ADJ["bias"] = None
    out[f"fed_{mode}_asis_own"] = pool([score(g, h) for h in H])
    out[f"fed_{mode}_mix_own"] = pool([score(g, h, h["mix"]) for h in H])
    # everyone's val, as is (global quality)
print(json.dumps({k: [round(v.accuracy, 4), round(v.macro_f1, 4)] for k, v in out.items()}), flush=True)
