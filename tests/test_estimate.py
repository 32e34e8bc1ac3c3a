"""siftune estimate: the shortcut equals the whole simulation, the fit fits, bad input is refused in one line."""
from __future__ import annotations

import json

import pytest
from transformers import BertConfig, GPT2Config, LlamaConfig, LlamaForCausalLM, MixtralConfig

from siftune.cli import main
from siftune.errors import ConfigError, ModelLoadError
from siftune.estimate import Setup, estimate, fit, load_config, parse_size
from siftune.estimate.command import fit_table
from siftune.estimate.fit import largest
from siftune.estimate.shapes import uniform_layers, with_layers


def small_llama(layers: int = 6) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, num_hidden_layers=layers, intermediate_size=172, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=500, max_position_embeddings=256)


@pytest.mark.parametrize("method, checkpointing", [("sift-lean", True), ("lora", False)])
def test_two_and_three_layers_extrapolate_to_the_whole_simulation(method, checkpointing):
    setup = Setup(method, density=0.05, rank=8, seq_len=32, gradient_checkpointing=checkpointing)
    short = estimate(small_llama(5), setup)
    whole = estimate(small_llama(5), setup, whole=True)
    assert short["simulated"].startswith("layers 2 and 3")
    assert whole["simulated"].startswith("all 5 layers")
    assert abs(short["peak_bytes"] / whole["peak_bytes"] - 1) <= 0.01
    assert abs(short["held_bytes"] / whole["held_bytes"] - 1) <= 0.01
    assert short["trainable"] == whole["trainable"] and short["params"] == whole["params"]


def test_three_and_four_layers_extrapolate_to_the_whole_fsdp_simulation():
    setup = Setup("sift-lean", density=0.05, seq_len=32, gradient_checkpointing=True)
    short = estimate(small_llama(5), setup, gpus=2, fsdp=True)
    whole = estimate(small_llama(5), setup, gpus=2, fsdp=True, whole=True)
    assert short["simulated"].startswith("layers 3 and 4")
    assert abs(short["peak_bytes"] / whole["peak_bytes"] - 1) <= 0.01
    assert short["step_s"] is None and "communication" in short["step_s_left_out"]


def test_layers_that_differ_are_simulated_whole():
    config = small_llama(4)
    config.layer_types = ["sliding_attention", "full_attention"] * 2
    assert "layer_types" in uniform_layers(config)
    assert with_layers(config, 2).layer_types == ["sliding_attention", "full_attention"]


def test_the_command_prints_a_table_with_parts_and_says_why_no_step_time(capsys):
    code = main(["estimate", "llama-tiny", "--methods", "sift", "frozen", "--seq-len", "32", "--density", "0.05",
                 "--quiet", "--json"])
    assert code == 0
    results = json.loads(capsys.readouterr().out)["results"]
    sift, frozen = results
    assert sift["peak_bytes"] > frozen["peak_bytes"] > 0
    assert sum(sift["parts"].values()) == sift["peak_bytes"]
    assert sift["selected"] == sift["trainable"] and 0.049 < sift["selected"] / sift["targeted"] < 0.051
    # A tiny step is bound by kernel launches: the H200 roofline is not stated for it.
    assert sift["step_s"] is None and "launches" in sift["step_s_left_out"]


def test_trainable_count_sets_the_density_over_the_whole_model():
    result = estimate(small_llama(2), Setup("sift", trainable=5000, seq_len=16))
    assert abs(result["trainable"] - 5000) <= 7 * 2  # rounding per targeted tensor, 7 a layer


def test_tied_embeddings_stay_one_tensor():
    config = small_llama(2)
    config.tie_word_embeddings = True
    result = estimate(config, Setup("full", seq_len=16))
    assert result["trainable"] == result["params"] == sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def test_fit_finds_a_density_that_fits_and_one_step_up_does_not():
    config = small_llama(2)
    setup = Setup("sift", seq_len=16)
    budget = estimate(config, setup.replace(density=0.4))["peak_bytes"]
    answer = fit(config, setup, "density", budget)
    assert answer["estimate"]["peak_bytes"] <= budget < answer["first_over"]["peak_bytes"]
    assert 0.4 * 0.99 <= answer["largest"] and answer["first_over"]["value"] <= answer["largest"] * 1.011
    assert answer["probes"] <= 10  # above 10%, where the default's top-k takes over: one probe at 10.1% first
    table = "\n".join(fit_table([answer], "small", "a budget"))
    assert f"| sift | {answer['largest']:.4g} (" in table


def test_bracketing_finds_the_largest_value_within_a_budget():
    calls = []

    def peak(x):
        calls.append(x)
        return 100 + 7 * x + (x > 50) * 30

    assert largest(peak, 1, 4096, 100 + 7 * 300 + 30, step=1)[0] == 300
    assert largest(peak, 1, 4096, 100 + 7 * 30, step=1)[0] == 30
    assert largest(peak, 1, 4096, 50, step=1)[0] is None
    assert len(calls) < 40


@pytest.mark.parametrize("text, expected", [("24GiB", 24 * 2**30), ("80 GiB", 80 * 2**30), ("40GB", 40 * 10**9),
                                            ("512MiB", 512 * 2**20), ("1.5TiB", int(1.5 * 2**40))])
def test_memory_sizes_parse_with_their_unit(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("argv, words", [
    (["estimate", "/no/such/folder"], "is not a named shape"),
    (["estimate", "llama-7b", "--density", "0"], "density must be in (0, 1]"),
    (["estimate", "llama-7b", "--density", "1.5"], "density must be in (0, 1]"),
    (["estimate", "llama-7b", "--fit", "24 gigs"], "cannot read '24 gigs' as a memory size"),
    (["estimate", "llama-7b", "--fit", "24"], "as a memory size"),
    (["estimate", "llama-7b", "--fsdp"], "give --gpus N with N >= 2"),
    (["estimate", "llama-7b", "--methods", "full", "--quantize", "nf4"], "cannot run on a base quantized to nf4"),
    (["estimate", "llama-7b", "--methods", "shira", "--quantize", "int8"], "cannot run on a base quantized to int8"),
    (["estimate", "llama-7b", "--int8-outliers", "0.01"], "give it with --quantize int8"),
    (["estimate", "llama-7b", "--quantize", "int8", "--int8-outliers", "1.5"], "in [0, 1]"),
    (["estimate", "llama-7b", "--gpus", "2", "--fsdp", "--quantize", "int8"], "not simulated under FSDP"),
])
def test_bad_input_is_one_line_and_exit_2(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1


def test_a_folder_without_config_json_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_config(str(tmp_path))


def test_an_encoder_decoder_is_refused_naming_why(tmp_path):
    from transformers import T5Config

    T5Config(num_layers=2, d_model=32, d_ff=64, num_heads=2, vocab_size=100).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="t5 model is an encoder-decoder"):
        estimate(load_config(str(tmp_path)), Setup("sift", seq_len=16))


def test_mixture_of_experts_routing_is_refused_naming_why(tmp_path, capsys):
    config = MixtralConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=2,
                           num_key_value_heads=2, vocab_size=100, num_local_experts=2)
    (tmp_path / "config.json").write_text(config.to_json_string())
    code = main(["estimate", str(tmp_path / "config.json"), "--methods", "full", "--seq-len", "16", "--quiet"])
    assert code == 2
    assert "mixture of experts" in capsys.readouterr().err


@pytest.mark.parametrize("config", [
    GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64),  # Conv1D layers, not Linear
    BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100),
], ids=["gpt2", "bert-classifier"])
def test_other_architectures_are_traced(config):
    result = estimate(config, Setup("sift", density=0.1, seq_len=16))
    assert result["peak_bytes"] > 0 and 0.099 <= result["selected"] / result["targeted"] <= 0.101

def test_structured_sift_adds_only_its_rows_gradient_products_to_the_frozen_floor():
    flops = {method: estimate(small_llama(4), Setup(method, density=0.05, seq_len=64), whole=True)["roofline"]["flops"]
             for method in ("frozen", "sift", "sift-rows")}
    # Unstructured SIFT computes every dense weight gradient; rows at 5% compute 5% of them.
    assert flops["sift-rows"] - flops["frozen"] < 0.1 * (flops["sift"] - flops["frozen"])


@pytest.mark.parametrize("budget, expected", [(145, 0.145), (100.5, 0.0505)])
def test_fit_searches_each_side_of_the_density_where_the_default_turns_to_the_top_k(monkeypatch, budget, expected):
    # Balanced's rounds hold more than the top-k's selection: the peak falls above 10%, where SiftConfig's
    # "auto" is the top-k. A peak of 1000 a unit of density, 50 more up to 10%.
    from siftune.estimate import extrapolate

    def estimate(config, setup, gpus, fsdp, progress=None):
        return dict(peak_bytes=1000 * setup.density + (50 if setup.density <= 0.1 else 0))

    monkeypatch.setattr(extrapolate, "estimate", estimate)
    answer = fit(None, Setup("sift"), "density", budget)
    assert expected * 0.98 <= answer["largest"] <= expected



def test_only_a_setup_whose_selection_turns_at_10_percent_is_searched_on_each_side():
    from siftune.estimate.fit import _balanced_up_to

    assert _balanced_up_to(Setup("sift"), gpus=1, fsdp=False) == 0.1
    assert _balanced_up_to(Setup("sift"), gpus=2, fsdp=True) is None  # shards: the top-k at every density
    assert _balanced_up_to(Setup("sift-rows"), gpus=1, fsdp=False) is None
    assert _balanced_up_to(Setup("sift", sift_options=dict(selection="gradient")), gpus=1, fsdp=False) is None
    assert _balanced_up_to(Setup("lora"), gpus=1, fsdp=False) is None


def test_the_command_says_nothing_of_torchs_module_tracking(capsys):
    # torch's module tracker warns that its hierarchy "maybe be messed up" when a checkpointed layer
    # recomputes, and replaces the process's warning format; the estimate reads only totals.
    import warnings

    formatwarning = warnings.formatwarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["estimate", "llama-tiny", "--methods", "sift", "--seq-len", "32", "--gradient-checkpointing",
                     "--quiet"])
    assert code == 0
    assert not [w for w in caught if "module hierarchy" in str(w.message)]
    assert "module hierarchy" not in capsys.readouterr().err
    assert warnings.formatwarning is formatwarning
