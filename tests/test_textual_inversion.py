"""Textual inversion and pivotal tuning: only the new vectors train, the files load where people use them
(diffusers' load_textual_inversion, A1111's bundle_emb keys), and samples, resume and the CLI use them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import interrupted_then_resumed
from difftune.cli.main import main
from difftune.config.loading import ConfigError
from difftune.config.schema import ModelConfig
from difftune.models import load_model
from difftune.models.clip_tokenizers import expand_multi_vector_tokens
from difftune.network.textual_inversion import TextualInversion, load_embedding_file
from difftune.training.loop import Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")

TOKEN = "<dgt>"
TI = {"type": "textual_inversion", "token": TOKEN, "num_vectors": 2}
PROMPT = f"a handwritten {TOKEN} seven"


@pytest.fixture(scope="module")
def token_digits(tmp_path_factory, digits_dir):
    """The digits with the token in their captions ("a handwritten <dgt> seven")."""
    root = tmp_path_factory.mktemp("token_digits")
    shutil.copytree(digits_dir, root, dirs_exist_ok=True)
    for caption in root.rglob("*.txt"):
        caption.write_text(caption.read_text().replace("handwritten digit", f"handwritten {TOKEN}"))
    return root


@pytest.fixture
def ti_config(quick_config, token_digits):
    def make(network=TI, model="tiny-sd", **sections):
        data = {"train_dir": str(token_digits), "val_split": 0.0, **sections.pop("data", {})}
        train_section = {"max_steps": 3, "lr": 5e-2, **sections.pop("train", {})}
        return quick_config(model={"path": model}, network=network, data=data, train=train_section, **sections)

    return make


def trained(config) -> Trainer:
    trainer = Trainer(config, show_progress=False)
    trainer.run()
    return trainer


def only_file(folder, name):
    path = folder / name
    assert path.is_file(), sorted(p.name for p in folder.iterdir())
    return path


def test_only_the_new_vectors_train_and_start_from_the_init_word(ti_config):
    config = ti_config(network={**TI, "init_word": "*"})
    trainer = Trainer(config, show_progress=False)
    try:
        model = trainer.model
        weights = {k: v.clone() for role in ("denoiser", "text_encoder", "vae")
                   for k, v in model.parts[role].state_dict().items()}
        star = model.tokenizer("*", add_special_tokens=False).input_ids[0]
        table = model.text_encoder.get_input_embeddings().weight
        start = trainer.network.state_dict()["embedding.text_encoder"].clone()
        assert torch.equal(start, table[[star, star]])  # both vectors start as '*' (A1111's default)
        [group] = trainer.optimizer.param_groups
        assert group["name"] == "embedding" and [tuple(p.shape) for p in group["params"]] == [(2, table.shape[1])]
        trainer.run()
        after = trainer.network.state_dict()["embedding.text_encoder"]
        assert not torch.equal(after, start)
        now = {k: v for role in ("denoiser", "text_encoder", "vae") for k, v in model.parts[role].state_dict().items()}
        assert all(torch.equal(weights[k], now[k]) for k in weights)  # the model itself, vocabulary included
    finally:
        trainer.close()


def test_a_multi_vector_token_is_written_out_in_captions_and_counted():
    model = load_model(ModelConfig(path="tiny-sd"))
    TextualInversion.build(model, TOKEN, num_vectors=3)
    assert expand_multi_vector_tokens(model.tokenizer, [PROMPT, "no token"]) == [
        f"a handwritten {TOKEN} {TOKEN}_1 {TOKEN}_2 seven", "no token"]
    counts, _ = model.text_token_counts([PROMPT])
    plain, _ = model.text_token_counts(["a handwritten  seven"])
    assert counts[0] == plain[0] + 3


def test_the_embedding_file_loads_in_diffusers_and_gives_the_trained_text(ti_config, tmp_path):
    trainer = trained(ti_config())
    path = only_file(trainer.run_dir.checkpoints / "final", "dgt.safetensors")
    tensors = load_file(path)
    assert list(tensors) == ["emb_params"] and tensors["emb_params"].shape == (2, 32)  # A1111/ComfyUI's key
    ours = trainer.model.encode_text([PROMPT])["encoder_hidden_states"]

    folder = tmp_path / "base"
    load_model(ModelConfig(path="tiny-sd")).save_pretrained(folder)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def render():
        embeds, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)
        image = pipe(PROMPT, num_inference_steps=2, height=16, width=16, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
        return embeds, image

    before_embeds, before = render()
    pipe.load_textual_inversion(str(path), token=TOKEN)
    after_embeds, after = render()
    assert torch.allclose(after_embeds, ours, atol=1e-6)  # diffusers reads the text difftune trained on
    assert not torch.allclose(before_embeds, after_embeds) and not (before == after).all()


def test_sdxl_files_have_clip_l_and_clip_g_and_the_pooled_text_stays_at_the_end_token(ti_config, tmp_path):
    trainer = trained(ti_config(model="tiny-sdxl"))
    tensors = load_file(only_file(trainer.run_dir.checkpoints / "final", "dgt.safetensors"))
    assert sorted(tensors) == ["clip_g", "clip_l"]
    model = trainer.model
    assert tensors["clip_l"].shape[1] == model.text_encoder.get_input_embeddings().weight.shape[1]
    assert tensors["clip_g"].shape[1] == model.text_encoder_2.get_input_embeddings().weight.shape[1]
    # CLIP pools at the end-of-text token; a config from before transformers' fix (eos_token_id 2, SDXL's own
    # text_encoder_2) finds it as the highest id, which a new token would be: the pooled text must stay at the end
    fresh = load_model(ModelConfig(path="tiny-sdxl"))
    fresh.text_encoder_2.text_model.eos_token_id = 2
    TextualInversion.build(fresh, TOKEN, num_vectors=2)
    ids = fresh.tokenizer_2([PROMPT], padding="max_length", max_length=fresh.tokenizer_2.model_max_length,
                            return_tensors="pt").input_ids
    end = int((ids[0] == fresh.tokenizer_2.eos_token_id).nonzero()[0])
    assert end > int(ids[0].argmax())  # the new tokens' ids are the highest
    with torch.no_grad():
        out = fresh.text_encoder_2(ids)
        assert torch.allclose(out.text_embeds[0], fresh.text_encoder_2.text_projection(out.last_hidden_state[0, end]),
                              atol=1e-6)


def test_sdxl_embedding_loads_in_diffusers_once_per_encoder(ti_config, tmp_path):
    trainer = trained(ti_config(model="tiny-sdxl"))
    tensors = load_file(trainer.run_dir.checkpoints / "final" / "dgt.safetensors")
    folder = tmp_path / "base"
    load_model(ModelConfig(path="tiny-sdxl")).save_pretrained(folder)
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.load_textual_inversion(tensors["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(tensors["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    ours = trainer.model.encode_text([PROMPT])
    assert torch.allclose(embeds, ours["encoder_hidden_states"], atol=1e-6)
    assert torch.allclose(pooled, ours["text_embeds"], atol=1e-6)


def test_samples_during_training_and_difftune_sample_use_the_embedding(ti_config, tmp_path):
    trainer = trained(ti_config(sample={"prompts": [PROMPT], "every_n_steps": 3, "steps": 2}))
    assert (trainer.run_dir.samples / "step-000003.png").is_file()
    path = trainer.run_dir.checkpoints / "final" / "dgt.safetensors"
    model = load_model(ModelConfig(path="tiny-sd"))
    ti = load_embedding_file(model, path)  # the token comes from the file's metadata
    assert ti.names == [TOKEN, f"{TOKEN}_1"]
    assert torch.allclose(model.encode_text([PROMPT])["encoder_hidden_states"],
                          trainer.model.encode_text([PROMPT])["encoder_hidden_states"], atol=1e-6)
    out = tmp_path / "s.png"
    assert main(["sample", "tiny-sd", "--embedding", str(path), "--prompt", PROMPT, "--steps", "2",
                 "--out", str(out)]) == 0
    assert out.is_file()


def test_resume_with_textual_inversion_is_bit_exact(ti_config, tmp_path):
    common = {"train": {"max_steps": 4}}
    whole = ti_config(output={"dir": str(tmp_path / "whole"), "save_every_n_steps": 2}, **common)
    train(whole, show_progress=False)
    part = ti_config(output={"dir": str(tmp_path / "part"), "save_every_n_steps": 2}, **common)
    interrupted_then_resumed(part, "step-000002", tmp_path / "part")
    a = load_file(tmp_path / "whole/checkpoints/final/dgt.safetensors")
    b = load_file(tmp_path / "part/checkpoints/final/dgt.safetensors")
    assert torch.equal(a["emb_params"], b["emb_params"])


def test_embedding_lr_sets_the_vectors_group(ti_config):
    trainer = Trainer(ti_config(train={"embedding_lr": 3e-3}), show_progress=False)
    try:
        assert [(g["name"], g["lr"]) for g in trainer.optimizer.param_groups] == [("embedding", 3e-3)]
    finally:
        trainer.close()


def test_pivotal_tuning_bundles_the_vectors_in_the_lora_file(ti_config, tmp_path):
    network = {"type": "lora", "rank": 4, "pivotal": True, "token": TOKEN, "num_vectors": 2}
    trainer = trained(ti_config(network=network, train={"embedding_lr": 1e-2}, output={"lora_format": "both"}))
    assert {g["name"]: g["lr"] for g in trainer.optimizer.param_groups} == {"denoiser": 5e-2, "embedding": 1e-2}
    final = trainer.run_dir.checkpoints / "final"
    lora = load_file(only_file(final, "run.safetensors"))
    embedding = load_file(only_file(final, "dgt.safetensors"))
    # A1111/Forge read bundle_emb.<name>.string_to_param.* (SD 1.x/2.x) from the LoRA file
    assert torch.equal(lora[f"bundle_emb.{TOKEN}.string_to_param.*"], embedding["emb_params"])
    assert not any(k.startswith("bundle_emb") for k in load_file(final / "pytorch_lora_weights.safetensors"))
    with safe_open(str(final / "run.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["difftune_embedding"])["token"] == TOKEN

    # difftune sample --lora brings the bundled vectors along; the LoRA layers load as before
    from difftune.network.lycoris_net import load_lora_file
    from difftune.network.textual_inversion import load_bundled_embeddings

    model = load_model(ModelConfig(path="tiny-sd"))
    load_lora_file(model, final / "run.safetensors")
    [ti] = load_bundled_embeddings(model, final / "run.safetensors")
    assert ti.token == TOKEN
    noisy = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))  # GroupNorm: more than 1 value
    t = torch.tensor([500, 500])
    with torch.no_grad():
        ours = trainer.model.predict(noisy, t, trainer.model.encode_text([PROMPT] * 2))
        loaded = model.predict(noisy, t, model.encode_text([PROMPT] * 2))
    assert torch.allclose(ours, loaded, atol=1e-5)

    # continuing from the file (network.init_from) starts from both its layers and its vectors
    again = Trainer(ti_config(network={**network, "init_from": str(final / "run.safetensors")},
                              output={"dir": str(tmp_path / "again")}), show_progress=False)
    try:
        assert torch.equal(again.network.state_dict()["embedding.text_encoder"], embedding["emb_params"])
    finally:
        again.close()
    # the diffusers-layout file has no bundle: the embedding file beside it continues the vectors, and says so
    beside = Trainer(ti_config(network={**network, "init_from": str(final / "pytorch_lora_weights.safetensors")},
                               output={"dir": str(tmp_path / "beside")}), show_progress=False)
    try:
        assert torch.equal(beside.network.state_dict()["embedding.text_encoder"], embedding["emb_params"])
        assert any("bundles no vectors; '<dgt>' continues from" in n for n in beside.notes)
    finally:
        beside.close()


def test_merge_and_convert_keep_the_bundled_embedding_as_a_file(ti_config, tmp_path):
    network = {"type": "lora", "rank": 4, "pivotal": True, "token": TOKEN}
    trainer = trained(ti_config(network=network, train={"max_steps": 1}))
    lora = trainer.run_dir.checkpoints / "final" / "run.safetensors"
    vectors = load_file(lora)[f"bundle_emb.{TOKEN}.string_to_param.*"]
    assert main(["merge", "tiny-sd", str(lora), str(tmp_path / "merged" / "model.safetensors")]) == 0
    assert torch.equal(load_file(tmp_path / "merged" / "dgt.safetensors")["emb_params"], vectors)
    assert main(["convert", str(lora), str(tmp_path / "conv" / "lora.safetensors"), "--to", "diffusers",
                 "--model", "tiny-sd"]) == 0
    assert torch.equal(load_file(tmp_path / "conv" / "dgt.safetensors")["emb_params"], vectors)
    assert not any(k.startswith("bundle_emb") for k in load_file(tmp_path / "conv" / "lora.safetensors"))


@pytest.mark.parametrize("network, message", [
    ({"type": "textual_inversion"}, "network.token is needed"),
    ({"type": "textual_inversion", "token": "<a>", "rank": 4}, "network.rank is not used by network.type = 'textual_inversion'"),
    ({"type": "textual_inversion", "token": "<a>", "pivotal": True}, "set network.type to that algorithm"),
    ({"pivotal": True, "token": "<a>"}, "network.pivotal = true trains textual-inversion vectors together"),
    ({"type": "lora", "token": "<a>"}, "network.token is a textual-inversion setting"),
    ({"type": "textual_inversion", "token": "two words"}, "one word without spaces"),
    ({"type": "textual_inversion", "token": "<a>", "preset": "full"}, "network.preset selects layers"),
    ({"type": "textual_inversion", "token": "<a>", "loraplus_lr_ratio": 16}, "train.embedding_lr"),
    ({"type": "textual_inversion", "token": "<a>", "train_text_encoder": True}, "trains the token's vectors only"),
    ({"type": "textual_inversion", "token": "<a>", "cache_text_embeddings": True}, "the token's vectors change"),
])
def test_config_errors_name_the_setting(quick_config, network, message):
    network = dict(network)
    sections = {"train": {"train_text_encoder": network.pop("train_text_encoder")}} if "train_text_encoder" in network else {}
    if "cache_text_embeddings" in network:
        sections["data"] = {"cache_text_embeddings": network.pop("cache_text_embeddings")}
    with pytest.raises(ConfigError, match=message):
        config = quick_config(network=network, **sections)
        from difftune.training.memory import memory_plan

        memory_plan(config, cuda=False)


def test_a_token_in_no_caption_or_already_a_word_is_refused(ti_config, quick_config):
    with pytest.raises(ConfigError, match=r"network.token = '<zzz>' is in none of the \d+ training captions"):
        Trainer(ti_config(network={**TI, "token": "<zzz>"}), show_progress=False)
    model = load_model(ModelConfig(path="tiny-sd"))
    with pytest.raises(ConfigError, match="'a' is already a word of the text_encoder tokenizer"):
        TextualInversion.build(model, "a")


def test_families_without_clip_embedding_files_refuse_it(ti_config):
    with pytest.raises(ConfigError, match="textual inversion .* is for the CLIP text encoders of SD 1.x/2.x and SDXL"):
        Trainer(ti_config(model="tiny-flux"), show_progress=False)


def test_bad_embedding_files_are_clear_errors(tmp_path, capsys):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "a1111.pt").write_bytes(b"\x80\x02")
    for name, message in (("missing.safetensors", "file not found"), ("empty.safetensors", "not a readable"),
                          ("a1111.pt", "read as .safetensors only")):
        code = main(["sample", "tiny-sd", "--embedding", str(tmp_path / name), "--prompt", "a", "--steps", "1",
                     "--out", str(tmp_path / "s.png")])
        assert code == 2 and message in capsys.readouterr().err


def test_a_diffusers_embedding_answers_to_its_key_and_one_word_loads_once(tmp_path):
    from safetensors.torch import save_file

    model = load_model(ModelConfig(path="tiny-sd"))
    width = model.text_encoder.get_input_embeddings().weight.shape[1]
    save_file({"<cat>": torch.ones(1, width)}, str(tmp_path / "learned_embeds.safetensors"))
    assert load_embedding_file(model, tmp_path / "learned_embeds.safetensors").token == "<cat>"
    with pytest.raises(Exception, match="an embedding for '<cat>' is loaded already"):
        load_embedding_file(model, tmp_path / "learned_embeds.safetensors")


def test_merge_never_overwrites_an_embedding_and_the_copy_keeps_its_token(ti_config, tmp_path):
    network = {"type": "lora", "rank": 4, "pivotal": True, "token": TOKEN}
    trainer = trained(ti_config(network=network, train={"max_steps": 1}))
    lora = trainer.run_dir.checkpoints / "final" / "run.safetensors"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "dgt.safetensors").write_bytes(b"mine")
    assert main(["merge", "tiny-sd", str(lora), str(tmp_path / "out" / "model.safetensors")]) == 2
    assert (tmp_path / "out" / "dgt.safetensors").read_bytes() == b"mine"  # and no merged model was written
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert main(["merge", "tiny-sd", str(lora), str(tmp_path / "folder")]) == 0
    copy = tmp_path / "folder" / "dgt.safetensors"  # a folder output holds its embedding
    assert load_embedding_file(load_model(ModelConfig(path="tiny-sd")), copy).token == TOKEN


def test_lr_from_keeps_the_other_lrs_ratios_and_embedding_lr_needs_vectors(tmp_path, quick_config):
    result = tmp_path / "find_lr.json"
    result.write_text(json.dumps({"lr": 1e-2, "verdict": "ok"}))
    config = quick_config(network=TI, train={"lr": 1e-3, "embedding_lr": 5e-3, "lr_from": str(result)})
    assert (config.train.lr, config.train.embedding_lr) == (pytest.approx(1e-2), pytest.approx(5e-2))
    with pytest.raises(ConfigError, match="train.embedding_lr is the LR of textual-inversion vectors"):
        quick_config(train={"embedding_lr": 1e-3})


def test_doctor_refuses_a_token_that_is_a_word_already(ti_config, tmp_path, capsys):
    import tomli_w

    from difftune.config.loading import config_to_dict

    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(config_to_dict(ti_config(network={**TI, "token": "a"}))))
    (tmp_path / "captions").mkdir()
    assert main(["doctor", str(path)]) == 2
    assert "'a' is already a word of the text_encoder tokenizer" in capsys.readouterr().err


def test_the_token_matches_captions_whatever_their_case(ti_config):
    trainer = Trainer(ti_config(network={**TI, "token": "<DGT>"}), show_progress=False)  # captions say <dgt>
    try:
        tokenizer = trainer.model.tokenizer
        new_ids = tokenizer.convert_tokens_to_ids(["<DGT>", "<DGT>_1"])
        [captions] = expand_multi_vector_tokens(tokenizer, ["a <dgt> b"])
        assert [i for i in tokenizer(captions).input_ids if i in new_ids] == new_ids  # both vectors, in order
    finally:
        trainer.close()
