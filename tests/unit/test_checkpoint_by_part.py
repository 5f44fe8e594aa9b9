"""Which grouped runs read their checkpoint into the ZeRO-3 slices (models/checkpoint_by_part.py),
judged from the files' headers and meta structures; the reading itself runs in
tests/distributed/scripts/group_trainer_check.py and tests/e2e/test_client_groups.py."""
import torch

from fedalign_dist.config import load_config
from fedalign_dist.models.checkpoint_by_part import checkpoint_files, covers, loads_by_part, outline_of
from fedalign_dist.models.packaged import resolve

BASE = "package:public-moe-8x2"
GROUPED = [f"model.path={BASE}", "model.num_experts=8", "fed.ranks_per_client=2", "local.batch_size=4"]


def test_a_grouped_full_fine_tuning_of_a_safetensors_checkpoint_reads_it_by_part():
    assert loads_by_part(load_config(None, GROUPED))


def test_ungrouped_lora_and_preset_runs_build_as_before():
    assert not loads_by_part(load_config(None, [*GROUPED, "fed.ranks_per_client=1"]))
    assert not loads_by_part(load_config(None, [*GROUPED, "model.finetune=lora"]))
    assert not loads_by_part(load_config(None, ["fed.ranks_per_client=2", "local.batch_size=4"]))


def test_the_checkpoint_covers_its_own_structure_with_tied_embeddings():
    outline = outline_of(BASE)
    assert all(p.is_meta for p in outline.parameters())
    assert outline.get_output_embeddings().weight is outline.get_input_embeddings().weight
    assert covers(outline, BASE)


def test_a_model_with_a_parameter_of_its_own_or_another_shape_is_not_covered():
    outline = outline_of(BASE)
    outline.model.norm.extra = torch.nn.Parameter(torch.empty(3, device="meta"))  # a strategy's addition
    assert not covers(outline, BASE)
    outline = outline_of(BASE)
    layer = outline.model.layers[0].self_attn.q_proj
    layer.weight = torch.nn.Parameter(torch.empty(layer.weight.shape[0] + 1, layer.weight.shape[1], device="meta"))
    assert not covers(outline, BASE)


def test_a_checkpoint_in_several_files_is_read_from_its_index(tmp_path):
    from transformers import AutoModelForCausalLM
    directory, _ = resolve(BASE)
    AutoModelForCausalLM.from_pretrained(directory).save_pretrained(tmp_path, max_shard_size="5MB")
    files = checkpoint_files(tmp_path)
    assert len(files) > 1 and all(f.suffix == ".safetensors" for f in files)
    assert covers(outline_of(str(tmp_path)), str(tmp_path))
    assert checkpoint_files(tmp_path / "missing") == []


def _saved_base(folder):
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(resolve(BASE)[0]).save_pretrained(folder)
    return folder


def test_a_quantized_checkpoint_is_read_whole_by_transformers_quantizer(tmp_path):
    import json

    from safetensors.torch import load_file, save_file
    grouped = lambda path: load_config(None, [*GROUPED, f"model.path={path}"])  # noqa: E731
    folder = _saved_base(tmp_path / "quantized_config")
    assert loads_by_part(grouped(folder))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    assert not loads_by_part(grouped(folder))
    folder = _saved_base(tmp_path / "fp8_tensor")  # a scale or weight in a dtype copy_ would misread
    state = load_file(folder / "model.safetensors")
    name = next(n for n in state if n.endswith("q_proj.weight"))
    save_file({**state, name: state[name].to(torch.float8_e4m3fn)}, folder / "model.safetensors", {"format": "pt"})
    assert not loads_by_part(grouped(folder))


def test_the_structure_keeps_the_checkpoints_generation_config(tmp_path):
    """The export by part writes the structure's generation_config.json, as from_pretrained's."""
    from transformers import GenerationConfig
    folder = _saved_base(tmp_path / "base")
    GenerationConfig(eos_token_id=[1, 3], temperature=0.7, do_sample=True).save_pretrained(folder)
    kept = outline_of(str(folder)).generation_config
    assert kept.eos_token_id == [1, 3] and kept.temperature == 0.7
