"""The runtime shim over pyvene's defects, and that runs leave the model as they found it."""

from __future__ import annotations

import torch

from interventions import parse_spec, run
from interventions.engine.pv import PYVENE_HOOK_MARK, RestoreIntervention, build_graph
from support import reference as ref

IDS = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])


def pyvene_hooks(model) -> int:
    return sum(PYVENE_HOOK_MARK in getattr(fn, "__qualname__", "")
               for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks) for fn in d.values())


def all_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_user_hooks_survive_pyvene_calls(tiny_llama):
    model, tokenizer = tiny_llama
    seen = []
    handle = model.model.layers[1].register_forward_hook(lambda m, a, o: seen.append(1))
    try:
        before = all_hooks(model)
        spec = parse_spec({"kind": "trace", "model": "tiny", "samples": 2, "sites": ["hidden"],
                           "prompts": [{"prompt": "the eiffel tower is in paris", "subject": "eiffel tower"}]})
        run(spec, model, tokenizer)
        assert all_hooks(model) == before and pyvene_hooks(model) == 0
        seen.clear()
        out = model(IDS, output_hidden_states=True)
        assert seen == [1] and len(out.hidden_states) == 5
    finally:
        handle.remove()


def test_hooks_removed_after_a_failing_call(tiny_llama):
    model, _ = tiny_llama
    graph = build_graph(model, [("model.layers[1].output", RestoreIntervention())])
    bad = {graph.sorted_keys[0]: torch.zeros(2, 1, 7)}    # wrong width: the intervention raises
    try:
        graph(base={"input_ids": IDS}, unit_locations={"base": [[[1], [2]]]}, source_representations=bad)
    except Exception:
        pass
    graph(base={"input_ids": IDS}, unit_locations={"base": [[[1], [2]]]},
          source_representations={graph.sorted_keys[0]: torch.zeros(2, 1, 32)})
    assert pyvene_hooks(model) == 0


def test_use_fast_does_not_stick_after_shorthand_locations(tiny_llama):
    model, _ = tiny_llama
    graph = build_graph(model, [("model.layers[1].output", RestoreIntervention())])
    key = graph.sorted_keys[0]
    source = torch.randn(2, 1, 32, generator=torch.Generator().manual_seed(0))
    graph(base={"input_ids": IDS}, unit_locations={"base": 2}, source_representations={key: source})
    _, out = graph(base={"input_ids": IDS}, unit_locations={"base": [[[1], [4]]]},
                   source_representations={key: source})
    for row, pos in ((0, 1), (1, 4)):
        clean = torch.zeros(6, 32)
        clean[pos] = source[row, 0]
        want = ref.last_logits(model, "llama", IDS[row:row + 1], restores=[("block_output", 1, [pos], clean)])
        assert torch.allclose(out.logits[row, -1], want[0], atol=1e-5)


def test_building_a_graph_and_running_leave_the_model_unchanged(tiny_llama):
    model, tokenizer = tiny_llama
    model.train()
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(False)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    try:
        build_graph(model, [("model.layers[1].output", RestoreIntervention())])
        spec = parse_spec({"kind": "patch", "model": "tiny", "sites": ["mlp_output", "mlp_key"],
                           "prompts": [{"base": "big ben is in london", "source": "the colosseum is in rome"}]})
        run(spec, model, tokenizer)
        assert all(m.training for m in model.modules())
        assert grads == {k: p.requires_grad for k, p in model.named_parameters()}
        assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    finally:
        model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)
        model.eval()
