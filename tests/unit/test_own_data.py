"""A user's own data: every file format the `files` source reads gives the same examples;
field errors name the file, the field and the fields that exist; labels of several tokens are
scored by their full likelihood; the instruction task's ROUGE-L is the rouge-score package's."""
import math

import pytest
import torch
from datasets import Dataset, DatasetDict

from fedalign_dist.config import ConfigError, load_config
from fedalign_dist.data.classification import ClassificationTask
from fedalign_dist.data.federated import build_federated_data, load_source
from fedalign_dist.data.instruction import InstructionTask, greedy_generate
from fedalign_dist.data.sources import Corpus
from fedalign_dist.data.tokenizer import ByteTokenizer

ROWS = {"note": [f"patient record {i}: {'cough' if i % 3 else 'fracture'} seen" for i in range(30)],
        "dept": ["pulmonology" if i % 3 else "orthopaedics" for i in range(30)],
        "site": [f"hospital_{i % 2}" for i in range(30)],
        "summary": [f"summary {i}" for i in range(30)]}
FIELDS = ["data.name=files", "data.files.text_field=note", "data.files.label_field=dept",
          "data.files.client_field=site", "data.files.response_field=summary"]


def write_all_formats(folder):
    table = Dataset.from_dict(ROWS)
    paths = {"jsonl": folder / "d.jsonl", "csv": folder / "d.csv", "parquet": folder / "d.parquet",
             "saved": folder / "saved", "saved_dict": folder / "saved_dict"}
    table.to_json(paths["jsonl"])
    table.to_csv(paths["csv"], index=False)
    table.to_parquet(paths["parquet"])
    table.save_to_disk(str(paths["saved"]))
    DatasetDict({"train": table}).save_to_disk(str(paths["saved_dict"]))
    return paths


def test_every_file_format_gives_the_same_examples(tmp_path):
    corpora = {}
    for fmt, path in write_all_formats(tmp_path).items():
        cfg = load_config(None, FIELDS + [f"data.files.path={path}"])
        corpora[fmt] = load_source(cfg.data)
    first = corpora["jsonl"]
    assert first.texts == ROWS["note"] and first.responses == ROWS["summary"]
    assert first.label_names == ["orthopaedics", "pulmonology"] and first.labels[:3] == [0, 1, 1]
    assert first.group_names == ["hospital_0", "hospital_1"] and first.groups[:3] == [0, 1, 0]
    for fmt, corpus in corpora.items():
        assert corpus == first, fmt


def test_field_errors_name_the_file_the_field_and_the_fields_there(tmp_path):
    path = write_all_formats(tmp_path)["csv"]
    cfg = load_config(None, ["data.name=files", f"data.files.path={path}", "data.files.text_field=notes",
                             "data.partition=iid"])
    with pytest.raises(ValueError, match=r"d.csv: data.files.text_field='notes' is not a field of this data; "
                                         r"its fields: note, dept, site, summary"):
        load_source(cfg.data)
    with pytest.raises(ConfigError, match="data.partition=dirichlet splits by label: set data.files.label_field"):
        load_config(None, ["data.name=files", f"data.files.path={path}"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(None, ["data.name=files", f"data.files.path={tmp_path / 'nope.csv'}", "data.partition=iid"])
    holes = tmp_path / "holes.jsonl"
    Dataset.from_dict({"text": ["a", "b", "c"], "label": ["x", None, "y"]}).to_json(holes)
    cfg = load_config(None, ["data.name=files", f"data.files.path={holes}", "data.files.label_field=label"])
    with pytest.raises(ValueError, match="1 example.s. have no value in field 'label'.*first at row 1"):
        load_source(cfg.data)


def test_a_broken_json_line_is_named_by_file_and_line(tmp_path):
    # a JSON Lines file whose third line was cut off (a copy interrupted mid-write)
    lines = write_all_formats(tmp_path)["jsonl"].read_text().splitlines()
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[:2] + [lines[2][:38]] + lines[3:]) + "\n")
    cfg = load_config(None, FIELDS + [f"data.files.path={cut}"])
    with pytest.raises(ValueError) as err:
        load_source(cfg.data)
    assert str(err.value).startswith(f"{cut}, line 3: not valid JSON (") and "\n" not in str(err.value)


def test_natural_and_iid_partitions_of_own_data(tmp_path):
    path = write_all_formats(tmp_path)["parquet"]
    cfg = load_config(None, FIELDS + [f"data.files.path={path}", "data.partition=natural", "fed.num_clients=2",
                                      "fed.clients_per_round=2", "data.min_client_examples=3"])
    data = build_federated_data(cfg.data, 2, 0, ByteTokenizer())
    for client, site in enumerate(["hospital_0", "hospital_1"]):
        indices = sorted(i for split in data.clients[client].values() for i in split)
        assert [ROWS["site"][i] for i in indices] == [site] * 15
    unlabelled = load_config(None, ["data.name=files", f"data.files.path={path}", "data.files.text_field=note",
                                    "data.partition=iid", "data.files.response_field=summary",
                                    "data.task=instruction", "fed.num_clients=3", "data.min_client_examples=3",
                                    "fed.clients_per_round=3"])
    data = build_federated_data(unlabelled.data, 3, 0, ByteTokenizer())
    assert data.labels is None and sum(len(s) for c in data.clients for s in c.values()) == 30


class BigramLM(torch.nn.Module):
    """A real (if tiny) language model with chosen next-token probabilities: logits at a
    position depend only on that position's token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, **_):
        from transformers import DynamicCache
        logits = self.table[input_ids]  # nothing to cache: the next token depends on this one only
        return type("Out", (), {"logits": logits[:, -logits_to_keep:] if logits_to_keep else logits,
                                "past_key_values": DynamicCache()})()


def bigram(next_probs: dict[int, dict[int, float]], vocab: int = 259) -> BigramLM:
    table = torch.full((vocab, vocab), -30.0)
    for token, probs in next_probs.items():
        for nxt, p in probs.items():
            table[token, nxt] = math.log(p)
    return BigramLM(table)


def test_labels_of_several_tokens_are_scored_by_their_full_likelihood():
    tok = ByteTokenizer()
    names = ["ab", "cd"]  # answers " ab<eos>" and " cd<eos>"
    task = ClassificationTask(tok, Corpus(["x", "y"], [0, 1], names), load_config(None, ["data.max_length=64"]).data)
    a, b, c, d, space, eos = (*map(ord, "abcd "), tok.eos_id)
    colon = task.options.prompt_suffix.encode()[-1]
    # first token: 'a' (0.6) beats 'c' (0.4); whole answer: 0.6 * 0.1 < 0.4 * 0.9
    model = bigram({colon: {space: 1.0}, space: {a: 0.6, c: 0.4}, a: {b: 0.1, eos: 0.9}, b: {eos: 1.0},
                    c: {d: 0.9, eos: 0.1}, d: {eos: 1.0}})
    example = task.encode({"text": "an article", "label": 1})
    sums = task.evaluate_sums(model, [example], batch_size=4, device=torch.device("cpu"))
    assert task.summarise(sums)["accuracy"] == 1.0
    assert sums[2].item() == pytest.approx(-math.log(0.4 * 0.9), rel=1e-5)  # the gold answer's full NLL
    # scoring the first answer token alone would pick "ab" (0.6 > 0.4): wrong


def test_instruction_rouge_l_is_the_libraries_value():
    from rouge_score import rouge_scorer
    tok = ByteTokenizer()
    cfg = load_config(None, ["data.task=instruction", "data.max_length=64", "data.instruction.max_response_tokens=12",
                             "data.instruction.generate_fraction=1"]).data
    task = InstructionTask(tok, Corpus(["x"], responses=["a cab"]), cfg)
    example = task.encode({"text": "an article", "response": "a cab", "id": 0})
    # the model writes " a-cub" then stops (every byte has one successor); ROUGE-L against
    # " a cab" is then 0.5 (tokens a, cub against a, cab), computed by the library
    chain = [ord(c) for c in ": a-cub"] + [tok.eos_id]
    model = bigram({token: {nxt: 1.0} for token, nxt in zip(chain, chain[1:])})
    produced = greedy_generate(model, [example["prompt"]], 12, tok, torch.device("cpu"))
    assert tok.decode(produced[0]) == " a-cub"
    sums = task.evaluate_sums(model, [example], batch_size=4, device=torch.device("cpu"))
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(" a cab", tok.decode(produced[0]))["rougeL"].fmeasure
    assert expected == pytest.approx(0.5) and sums[3].item() == 1 and sums[2].item() == pytest.approx(expected)
    assert task.summarise(sums)["rougeL"] == pytest.approx(expected)


def test_instruction_prompt_goes_through_the_models_chat_template():
    from fedalign_dist.data.tokenizer import build_tokenizer
    tok = build_tokenizer("model", "package:smollm2-135m-instruct")  # ships a chat template
    cfg = load_config(None, ["data.task=instruction", "data.max_length=96"]).data
    task = InstructionTask(tok, Corpus(["x"], responses=["y"]), cfg)
    example = task.encode({"text": "Profits at the media giant jumped. " * 20, "response": "Ad sales boost profit",
                           "id": 0})
    prompt = tok.decode(example["prompt"])
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert (
        "<|im_start|>user\nProfits at the media giant jumped." in prompt and len(example["prompt"]) <= task.max_prompt
    )
    assert tok.decode(example["response"]) == "Ad sales boost profit<|im_end|>"
    plain = InstructionTask(tok, Corpus(["x"], responses=["y"]),
                            load_config(None, ["data.task=instruction", "data.instruction.chat_template=false"]).data)
    assert tok.decode(plain.encode({"text": "Profits.", "response": "Up", "id": 0})["prompt"]).endswith(
        "Profits.\nAnswer:"
    )


def test_instruction_generation_sample_does_not_depend_on_how_examples_are_sharded():
    """Global evaluation is sharded over ranks: the generated examples, hence ROUGE-L, must be
    the same on any number of ranks (per-example seeded sample, not 'the first N')."""
    tok = ByteTokenizer()
    cfg = load_config(None, ["data.task=instruction", "data.max_length=48", "data.instruction.max_response_tokens=6",
                             "data.instruction.generate_fraction=0.3"]).data
    texts = [f"article {i}" for i in range(40)]
    task = InstructionTask(tok, Corpus(texts, responses=["ab"] * 40), cfg, seed=3)
    examples = [task.encode({"text": t, "response": "ab", "id": i}) for i, t in enumerate(texts)]
    assert 4 <= sum(ex["generate"] for ex in examples) <= 20
    chain = [ord(c) for c in ": ab"] + [tok.eos_id]
    model = bigram({token: {nxt: 1.0} for token, nxt in zip(chain, chain[1:])})
    cpu = torch.device("cpu")
    whole = task.evaluate_sums(model, examples, 8, cpu)
    sharded = task.evaluate_sums(model, examples[0::2], 8, cpu) + task.evaluate_sums(model, examples[1::2], 8, cpu)
    assert whole[3] == sum(ex["generate"] for ex in examples) and torch.allclose(whole, sharded)
    assert task.summarise(whole)["rougeL"] == pytest.approx(1.0)
