"""The final export by part (client groups): one safetensors file written by several writers at
computed offsets, and a Hugging Face checkpoint written as one shard file per writer with its
index; each reads back, with safetensors' and transformers' own loaders, as the whole save."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fedalign_dist.aggregation.shards import assign_shards, shard_of
from fedalign_dist.config import load_config
from fedalign_dist.data.tokenizer import ByteTokenizer
from fedalign_dist.models.build import build_model
from fedalign_dist.models.hf_parts import INDEX_NAME, write_model_index, write_model_part
from fedalign_dist.safetensors_parts import check_complete, layout_of, spec_of, write_part


def _parts(state: dict, parts: int) -> list[dict]:
    owner = assign_shards({n: t.numel() for n, t in state.items()}, parts)
    return [{n: state[n] for n in shard_of(owner, p)} for p in range(parts)]


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 0, 1]])
def test_one_file_written_by_three_writers_in_any_order_loads_as_the_whole(tmp_path, order):
    gen = torch.Generator().manual_seed(0)
    state = {"b.weight": torch.randn(5, 3, generator=gen), "a.bias": torch.randn(7, generator=gen),
             "c.half": torch.randn(4, 2, generator=gen).to(torch.bfloat16), "d.count": torch.arange(3),
             "e.scalar": torch.tensor(2.5), "f.empty": torch.zeros(0, 4), "g.mask": torch.tensor([True, False])}
    layout = layout_of({n: spec_of(t) for n, t in state.items()})
    path, parts = tmp_path / "global.safetensors", _parts(state, 3)
    for p in order:  # the header is the first writer's job, whichever comes first in time
        write_part(path, layout, parts[p], header=p == 0)
    check_complete(path, layout)
    back = load_file(path)
    assert back.keys() == state.keys()
    for name, value in state.items():
        assert back[name].dtype == value.dtype and torch.equal(back[name], value), name
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_a_missing_last_part_is_caught_and_a_wrong_size_refused(tmp_path):
    state = {"a": torch.ones(4), "b": torch.ones(100)}
    layout = layout_of({n: spec_of(t) for n, t in state.items()})
    path = tmp_path / "x.safetensors"
    write_part(path, layout, {"a": state["a"]}, header=True)
    with pytest.raises(RuntimeError, match="a part is missing"):
        check_complete(path, layout)
    with pytest.raises(ValueError, match="b: 16 bytes where the layout holds 400"):
        write_part(path, layout, {"b": torch.ones(4)}, header=False)


def test_a_model_written_in_parts_loads_with_from_pretrained_as_the_whole_save(tmp_path):
    import transformers
    cfg = load_config(None, ["model.family=mixtral"])
    model = build_model(cfg, ByteTokenizer())[0]
    state = {n: p.detach() for n, p in model.named_parameters()}
    state["model.layers.0.mlp.experts.gate_up_proj"] = state["model.layers.0.mlp.experts.gate_up_proj"] + 1
    parts = _parts(state, 2)
    assert all(any("experts" in n for n in part) for part in parts), "fused expert tensors in one part only"
    infos = [write_model_part(tmp_path, model, part, i, 2) for i, part in reversed(list(enumerate(parts)))][::-1]
    infos = json.loads(json.dumps(infos))  # as the ranks send them to the coordinator
    write_model_index(tmp_path, model, infos, {n: spec_of(t) for n, t in state.items()})
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    # on disk as a whole save writes it: fused experts split per expert (transformers' own reversal)
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in index["weight_map"]
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert type(reloaded) is type(model) and reloaded.config.dtype == torch.float32
    params = dict(reloaded.named_parameters())
    for name, value in state.items():
        assert torch.equal(params[name].detach(), value), name
    whole = tmp_path / "whole"
    model.save_pretrained(str(whole), state_dict=state)
    assert set(load_file(whole / "model.safetensors")) == set(index["weight_map"])


@pytest.mark.parametrize("damage, words", [
    ("missing", r"\['.*'\] differ: a whole save writes \[\['F32'"),
    ("twice", "written by parts model-00001-of-00002.safetensors and model-00002-of-00002.safetensors"),
    ("half", r"differ: a whole save writes \[\['F32', \[(\d+), (\d+)\]\]\], the parts \[\['F32', \[\d+, \2\]\]\]"),
])
def test_parts_that_do_not_make_the_whole_save_are_refused_by_the_index(tmp_path, damage, words):
    """A tensor no part wrote; one that two parts each wrote (the halves of a tensor a conversion
    joins, when its sources lie in two parts); one of the wrong shape."""
    cfg = load_config(None, ["model.family=mixtral"])
    model = build_model(cfg, ByteTokenizer())[0]
    state = {n: p.detach() for n, p in model.named_parameters()}
    infos = [write_model_part(tmp_path, model, part, i, 2) for i, part in enumerate(_parts(state, 2))]
    infos = json.loads(json.dumps(infos))  # what the ranks send each other
    name = next(iter(infos[0]["specs"]))
    if damage == "missing":
        del infos[0]["specs"][name]
    elif damage == "twice":
        infos[1]["specs"][name] = infos[0]["specs"][name]
    else:
        dtype, shape = infos[0]["specs"][name]
        infos[0]["specs"][name] = [dtype, [shape[0] // 2, *shape[1:]]]
    with pytest.raises(RuntimeError, match=words):
        write_model_index(tmp_path, model, infos, {n: spec_of(t) for n, t in state.items()})


def test_a_conversion_that_joins_tensors_of_two_parts_is_refused_before_training(monkeypatch):
    """No family the project builds has one (each on-disk tensor comes from one in memory), so a
    checkpoint format is made up whose one on-disk tensor is two in memory: split over two
    parts, each would write half of it under the same name."""
    import transformers
    from transformers import conversion_mapping
    from transformers.core_model_loading import Chunk, WeightConverter

    from fedalign_dist.models.families import dense_preset_config
    from fedalign_dist.models.hf_parts import check_plan
    conversion_mapping.get_checkpoint_conversion_mapping("llama")  # builds the registry, restored after the test
    monkeypatch.setitem(conversion_mapping._checkpoint_conversion_mapping_cache, "llama", [WeightConverter(
        source_patterns="mlp.gate_up_proj.weight", target_patterns=["mlp.gate_proj.weight", "mlp.up_proj.weight"],
        operations=[Chunk(dim=0)])])
    model = transformers.AutoModelForCausalLM.from_config(dense_preset_config("tiny", 100, 64, 0, 1, 2))
    specs = {n: spec_of(p.detach()) for n, p in model.named_parameters()}
    apart = [{n: s for n, s in specs.items() if "up_proj" not in n}, {n: s for n, s in specs.items() if "up_proj" in n}]
    with pytest.raises(RuntimeError, match="gate_up_proj.weight written by parts .* run with fed.ranks_per_client=1"):
        check_plan(model, apart)
    together = [{n: s for n, s in specs.items() if ".mlp." not in n}, {n: s for n, s in specs.items() if ".mlp." in n}]
    check_plan(model, together)
