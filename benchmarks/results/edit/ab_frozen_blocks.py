import time, sys, torch
from peft import get_peft_model
from peft_persedit import PersonalizationEditConfig, load_default_model
from peft_persedit.data_paths import dataset_path
from peft_persedit.editing import PersonalizationEditor
from peft_persedit.editing import values as V
from peft_persedit.editing.frozen_blocks import FrozenBlocks
from peft_persedit.preferences import load_preferences
model, tok = load_default_model()
prefs = load_preferences(dataset_path("upqa_balanced100"))[:40]
pm = get_peft_model(model, PersonalizationEditConfig(value_steps=3), adapter_name="t").eval()
orig = V.optimize_values; T = {}
def timed(*a, **k):
    t = time.perf_counter(); r = orig(*a, **k); T["v"] = time.perf_counter() - t; return r
import peft_persedit.editing.editor as E
E.optimize_values = timed
ed = PersonalizationEditor(pm, tok, adapter_name="t", progress=False)
res = {True: [], False: []}
for rep in range(2):
    for on in (True, False):
        FrozenBlocks.__bool__ = (lambda self: bool(self.blocks)) if on else (lambda self: False)
        ed.edit_users({f"u{rep}{i}{on}": [p] for i, p in enumerate(prefs)}, verify=False)
        res[on].append(round(T["v"], 1))
print("values s, 3 full steps, 40 prefs: frozen", res[True], "not frozen", res[False])
