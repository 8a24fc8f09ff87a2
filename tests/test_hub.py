"""Hub round trips against the local Hub-compatible server in ``hub_server.py`` (no network)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import hf_hub_download, model_info, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
from peft import AutoPeftModelForCausalLM, PeftModel
from test_trust import IDS, fresh_base, make_adapter, rewrite_tensors
from tiny_models import logits
from transformers import AutoModelForCausalLM

from hf_deltacome import AdapterFileError
from hf_deltacome.hub import CARD_MARKER, push_adapter, render_model_card, write_model_card
from hf_deltacome.io.adapter_files import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, read_adapter_config

pytest_plugins = ["hub_server"]

BASE_ID = "fake-user/tiny-base"
ADAPTER_ID = "fake-user/tiny-adapter"


def front_matter(text: str) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert m, text[:200]
    return yaml.safe_load(m.group(1))


def push_base(hub, tmp_path: Path) -> None:
    folder = tmp_path / "base"
    fresh_base().save_pretrained(str(folder))
    api = hub.api()
    api.create_repo(BASE_ID)
    api.upload_folder(folder_path=str(folder), repo_id=BASE_ID, commit_message="tiny base")


def hub_base(**kwargs) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(BASE_ID, **kwargs).eval()


@pytest.fixture
def pushed(hub, tmp_path):
    """Base on the Hub; an adapter compressed against it pushed with ``model.push_to_hub``; its logits."""
    push_base(hub, tmp_path)
    model = make_adapter(hub_base(), seed=1)
    model.push_to_hub(ADAPTER_ID)
    return model, logits(model, IDS)


# ------------------------------------------------------------------------------------------------------------
# the test Hub itself
# ------------------------------------------------------------------------------------------------------------


def test_server_create_upload_info_download_and_pinning(hub, tmp_path):
    api = hub.api()
    url = api.create_repo("fake-user/raw")
    assert url.repo_id == "fake-user/raw"
    api.create_repo("fake-user/raw", exist_ok=True)
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "notes.txt").write_text("one")
    (folder / "w.safetensors").write_bytes(os.urandom(4096))
    first = api.upload_folder(folder_path=str(folder), repo_id="fake-user/raw", commit_message="v1").oid
    (folder / "notes.txt").write_text("two")
    second = api.upload_folder(folder_path=str(folder), repo_id="fake-user/raw", commit_message="v2").oid
    assert first != second
    assert ("POST", "/fake-user/raw.git/info/lfs/objects/batch") in hub.state.requests  # LFS path used
    info = api.model_info("fake-user/raw", files_metadata=True)
    assert info.sha == second
    siblings = {s.rfilename: s for s in info.siblings}
    assert siblings["w.safetensors"].lfs is not None and siblings["notes.txt"].lfs is None
    assert open(hf_hub_download("fake-user/raw", "notes.txt")).read() == "two"
    assert open(hf_hub_download("fake-user/raw", "notes.txt", revision=first)).read() == "one"
    assert api.model_info("fake-user/raw", revision=first).sha == first
    api.create_branch("fake-user/raw", branch="dev", revision=first)
    assert open(hf_hub_download("fake-user/raw", "notes.txt", revision="dev")).read() == "one"
    assert {b.name for b in api.list_repo_refs("fake-user/raw").branches} == {"main", "dev"}
    assert [c.title for c in api.list_repo_commits("fake-user/raw")] == ["v2", "v1", "initial commit"]
    snap = snapshot_download("fake-user/raw", revision=first)
    assert (Path(snap) / "w.safetensors").read_bytes() == (folder / "w.safetensors").read_bytes()


# ------------------------------------------------------------------------------------------------------------
# model card
# ------------------------------------------------------------------------------------------------------------


def test_render_model_card(tmp_path):
    model = make_adapter(fresh_base())
    config = model.peft_config["default"]
    config.base_model_name_or_path = BASE_ID
    card = render_model_card(
        config, evaluation={"gsm8k": {"fine-tuned": 55.2, "compressed": 53.6}}, repo_id="someone/adapter"
    )
    meta = front_matter(card)
    assert meta["base_model"] == BASE_ID
    assert meta["library_name"] == "peft"
    assert meta["license"] == "apache-2.0"  # from compression_info (the fine-tune's license)
    assert {"deltacome", "delta-compression", f"base_model:adapter:{BASE_ID}"} <= set(meta["tags"])
    assert CARD_MARKER in card
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1).strip().splitlines()
    assert len(snippet) == 3 and 'from_pretrained("someone/adapter")' in snippet[2]
    packed = sum(  # every byte the modules store, as the file will hold them
        m.deltacome_delta["default"].nbytes() for m in model.modules() if hasattr(m, "deltacome_delta")
    )
    assert f"| packed factor bytes | {packed:,} B" in card
    assert "| bits per band | 8-bit: up to 2 vectors; 3-bit: up to 32 vectors; 2-bit: the rest of the budget |" in card
    assert "| `q_proj` | 2 | 64 × 64 | 8:2 3:4 2:8 |" in card
    assert "| gsm8k | 55.2 | 53.6 |" in card
    assert "fake-user/tiny-finetune (Delta-CoMe compressed)" in card
    plain = render_model_card(config)
    assert "## Evaluation" not in plain
    config.base_model_name_or_path = str(tmp_path)  # a local path is not valid Hub metadata
    assert "base_model" not in front_matter(render_model_card(config))


def test_save_pretrained_writes_our_card_and_keeps_a_hand_written_one(tmp_path):
    model = make_adapter(fresh_base())
    model.save_pretrained(str(tmp_path / "a"))
    card = (tmp_path / "a" / "README.md").read_text()
    assert CARD_MARKER in card and "Model Card for Model ID" not in card
    assert front_matter(card)["library_name"] == "peft"
    assert "| dense extras bytes (modules_to_save) | 256 B |" in card  # model.norm: 64 float32
    (tmp_path / "a" / "README.md").write_text("# My own card\n")
    model.save_pretrained(str(tmp_path / "a"))
    assert (tmp_path / "a" / "README.md").read_text() == "# My own card\n"
    assert write_model_card(tmp_path / "a", model.peft_config["default"]) is None
    assert write_model_card(tmp_path / "a", model.peft_config["default"], force=True) is not None


# ------------------------------------------------------------------------------------------------------------
# push and load back
# ------------------------------------------------------------------------------------------------------------


def test_push_to_hub_and_load_back(hub, pushed):
    model, expected = pushed
    info = model_info(ADAPTER_ID, files_metadata=True)
    assert {s.rfilename for s in info.siblings} == {
        ".gitattributes",
        "README.md",
        ADAPTER_CONFIG_NAME,
        ADAPTER_WEIGHTS_NAME,
    }
    assert info.library_name == "peft" and "deltacome" in info.tags
    card = Path(hf_hub_download(ADAPTER_ID, "README.md")).read_text()
    assert CARD_MARKER in card and f'from_pretrained("{ADAPTER_ID}")' in card
    assert front_matter(card)["base_model"] == BASE_ID
    loaded = PeftModel.from_pretrained(hub_base(), ADAPTER_ID).eval()
    torch.testing.assert_close(logits(loaded, IDS), expected)
    auto = AutoPeftModelForCausalLM.from_pretrained(ADAPTER_ID).eval()
    torch.testing.assert_close(logits(auto, IDS), expected)


def test_load_by_id_checks_the_base(hub, pushed):
    from hf_deltacome import BaseModelMismatchError

    other = fresh_base(seed=5)
    with pytest.raises(BaseModelMismatchError, match=f"adapter '{ADAPTER_ID}' was compressed against base {BASE_ID}"):
        PeftModel.from_pretrained(other, ADAPTER_ID)


def test_revision_pinning(hub, pushed, tmp_path):
    _, v1 = pushed
    first = model_info(ADAPTER_ID).sha
    v2_model = make_adapter(hub_base(), seed=2)
    v2_model.push_to_hub(ADAPTER_ID, commit_message="v2")
    v2 = logits(v2_model, IDS)
    assert model_info(ADAPTER_ID).sha != first
    torch.testing.assert_close(logits(PeftModel.from_pretrained(hub_base(), ADAPTER_ID), IDS), v2)
    pinned = PeftModel.from_pretrained(hub_base(), ADAPTER_ID, revision=first)
    torch.testing.assert_close(logits(pinned, IDS), v1)
    # a branch: push_adapter(revision=...) creates it from main and leaves main alone
    v3_model = make_adapter(hub_base(), seed=3)
    v3_model.save_pretrained(str(tmp_path / "v3"))
    commit = push_adapter(tmp_path / "v3", ADAPTER_ID, revision="dev", commit_message="v3 on dev")
    assert model_info(ADAPTER_ID, revision="dev").sha == commit.oid
    torch.testing.assert_close(
        logits(PeftModel.from_pretrained(hub_base(), ADAPTER_ID, revision="dev"), IDS), logits(v3_model, IDS)
    )
    torch.testing.assert_close(logits(PeftModel.from_pretrained(hub_base(), ADAPTER_ID), IDS), v2)


def test_offline_after_download(hub, pushed, monkeypatch):
    _, expected = pushed
    first = model_info(ADAPTER_ID).sha
    PeftModel.from_pretrained(hub_base(), ADAPTER_ID)  # fills the cache
    AutoPeftModelForCausalLM.from_pretrained(ADAPTER_ID)
    n_requests = len(hub.state.requests)
    hub.set_offline(monkeypatch)
    loaded = PeftModel.from_pretrained(hub_base(), ADAPTER_ID).eval()
    torch.testing.assert_close(logits(loaded, IDS), expected)
    auto = AutoPeftModelForCausalLM.from_pretrained(ADAPTER_ID).eval()
    torch.testing.assert_close(logits(auto, IDS), expected)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(hub_base(), ADAPTER_ID, revision=first), IDS), expected)
    # never downloaded: offline must fail, not reach the server (PEFT turns the cache miss into its ValueError)
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json' at 'fake-user/never-downloaded'") as info:
        PeftModel.from_pretrained(hub_base(), "fake-user/never-downloaded")
    assert isinstance(info.value.__context__, LocalEntryNotFoundError)
    assert len(hub.state.requests) == n_requests


def test_offline_env_var_in_a_fresh_process(hub, pushed, tmp_path):
    """A new process reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE at import, as users set them."""
    _, expected = pushed
    AutoPeftModelForCausalLM.from_pretrained(ADAPTER_ID)  # fill the cache
    n_requests = len(hub.state.requests)
    out = tmp_path / "logits.pt"
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_trust
        from peft import AutoPeftModelForCausalLM
        model = AutoPeftModelForCausalLM.from_pretrained({ADAPTER_ID!r}).eval()
        torch.save(test_trust.logits(model, test_trust.IDS), {str(out)!r})
        """
    )
    env = {**os.environ, **hub.env, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.load(out), expected)
    assert len(hub.state.requests) == n_requests


def test_private_repo_needs_the_token(hub, tmp_path, monkeypatch):
    push_base(hub, tmp_path)
    model = make_adapter(hub_base(), seed=1)
    model.save_pretrained(str(tmp_path / "a"))
    push_adapter(tmp_path / "a", "fake-user/private-adapter", private=True, token=hub.token)
    assert model_info("fake-user/private-adapter").private
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(RepositoryNotFoundError):
        model_info("fake-user/private-adapter")
    # PEFT turns the 401 into its own ValueError
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json' at 'fake-user/private-adapter'") as info:
        PeftModel.from_pretrained(hub_base(), "fake-user/private-adapter")
    assert isinstance(info.value.__context__, RepositoryNotFoundError) and "401" in str(info.value.__context__)
    loaded = PeftModel.from_pretrained(hub_base(), "fake-user/private-adapter", token=hub.token)
    torch.testing.assert_close(logits(loaded, IDS), logits(model, IDS))


def test_push_refuses_a_corrupted_adapter(hub, tmp_path):
    model = make_adapter(fresh_base())
    model.save_pretrained(str(tmp_path / "a"))
    key = "base_model.model.model.layers.0.mlp.up_proj.deltacome_delta.bands.0.s"
    rewrite_tensors(tmp_path / "a", lambda t: t[key].fill_(float("nan")))
    with pytest.raises(AdapterFileError, match="contains NaN"):
        push_adapter(tmp_path / "a", "fake-user/bad")
    with pytest.raises(RepositoryNotFoundError):
        model_info("fake-user/bad")


def test_push_adapter_keeps_hand_written_card_and_tags(hub, tmp_path):
    model = make_adapter(fresh_base())
    folder = tmp_path / "a"
    model.save_pretrained(str(folder))
    push_adapter(folder, "fake-user/with-tags", tags=["math"], evaluation={"gsm8k": 53.6})
    card = Path(hf_hub_download("fake-user/with-tags", "README.md")).read_text()
    assert "math" in front_matter(card)["tags"] and "| gsm8k | 53.6 |" in card
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# hand written\n")
    push_adapter(folder, "fake-user/with-tags")
    assert Path(hf_hub_download("fake-user/with-tags", "README.md")).read_text().endswith("# hand written\n")


def test_pushed_config_round_trips(hub, pushed, tmp_path):
    model, _ = pushed
    local = read_adapter_config(Path(hf_hub_download(ADAPTER_ID, ADAPTER_CONFIG_NAME)).parent)
    assert local.layout == model.peft_config["default"].layout
    assert local.base_model_name_or_path == BASE_ID
    assert json.loads(Path(hf_hub_download(ADAPTER_ID, ADAPTER_CONFIG_NAME)).read_text())["peft_type"] == "DELTACOME"


def test_a_transformers_model_holding_our_adapter_pushes_it_as_a_peft_model_does(hub, tmp_path):
    """``model.load_adapter`` then ``model.push_to_hub`` or ``save_pretrained(push_to_hub=True)`` (transformers'
    paths): validated, our card for the repo, loadable; the repo is named after the folder as transformers names it,
    not after the temporary folder the save swaps in."""
    push_base(hub, tmp_path)
    make_adapter(hub_base(), seed=1).save_pretrained(str(tmp_path / "a"))
    model = hub_base()
    model.load_adapter(str(tmp_path / "a"))
    expected = logits(model, IDS)
    model.push_to_hub("fake-user/from-transformers")
    model.save_pretrained(str(tmp_path / "tf-saved"), push_to_hub=True)
    model.save_pretrained(str(tmp_path / "b"), push_to_hub=True, repo_id="fake-user/named", commit_message="mine")
    assert sorted(os.listdir(tmp_path / "b")) == ["README.md", ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, "generation_config.json"]  # fmt: skip
    assert hub.api().list_repo_commits("fake-user/named")[0].title == "mine"
    for repo in ("fake-user/from-transformers", "fake-user/tf-saved", "fake-user/named"):
        card = Path(hf_hub_download(repo, "README.md")).read_text()
        assert CARD_MARKER in card and f'from_pretrained("{repo}")' in card and front_matter(card)["base_model"] == BASE_ID
        torch.testing.assert_close(logits(PeftModel.from_pretrained(hub_base(), repo).eval(), IDS), expected)
    with pytest.raises(TypeError, match="'not_a_push_option'"):
        model.save_pretrained(str(tmp_path / "c"), push_to_hub=True, not_a_push_option=1)
    assert not (tmp_path / "c").exists()
