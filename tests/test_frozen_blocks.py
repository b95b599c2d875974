"""The value step's frozen lower blocks (editing/frozen_blocks.py): their output is captured once per chunk and
replayed on every step, on tiny models."""

from __future__ import annotations

import torch
from helpers import edit_layers, multi_prompt_requests, tiny_pm


def test_values_replaying_the_blocks_below_the_edit_layer_equal_running_them(tokenizer, monkeypatch):
    """The value steps replay the output of the blocks below δ's layer (computed once per chunk) instead of running
    them: the same δ as running every block on every step, and the blocks' own forward is back afterwards."""
    from peft_persedit.editing import values
    from peft_persedit.editing.frozen_blocks import FrozenBlocks

    pm = tiny_pm()
    layer = edit_layers(pm)[0]
    requests = multi_prompt_requests(tokenizer)
    common = dict(steps=4, lr=0.5, nll_stop=-1.0, progress=False)
    made = []
    monkeypatch.setattr(values, "FrozenBlocks", lambda *a: made.append(FrozenBlocks(*a)) or made[-1])
    replayed = values.optimize_values(pm, layer, requests, 2, **common).deltas
    assert len(made[0].blocks) == 1 and all("forward" not in b.__dict__ for b in made[0].blocks)
    monkeypatch.setattr(FrozenBlocks, "__bool__", lambda self: False)  # no block is frozen: all run every step
    run = values.optimize_values(pm, layer, requests, 2, **common).deltas
    torch.testing.assert_close(replayed, run, atol=1e-5, rtol=1e-4)


def test_frozen_blocks_replay_their_output_and_restore_each_blocks_own_forward():
    """Within replay() the blocks below the edit layer return the captured output without running; afterwards each
    block's forward is what it was, including one set on the instance (as accelerate's hooks do)."""
    from peft_persedit.editing.frozen_blocks import FrozenBlocks
    from peft_persedit.editing.prefix_cache import decoder_of

    pm = tiny_pm()
    blocks = FrozenBlocks(decoder_of(pm), edit_layers(pm)[0])
    own = blocks.blocks[0].forward
    blocks.blocks[0].forward = wrapped = lambda *args, **kwargs: own(*args, **kwargs)
    ids = torch.tensor([[5, 6, 7]])
    output = blocks.capture(lambda: decoder_of(pm)(input_ids=ids))
    hidden = output if isinstance(output, torch.Tensor) else output[0]
    assert hidden.shape[:2] == (1, 3)
    with blocks.replay(output):
        assert blocks.blocks[0]() is output
    assert blocks.blocks[0].forward is wrapped
    del blocks.blocks[0].forward
    with blocks.replay(output):
        pass
    assert "forward" not in blocks.blocks[0].__dict__
