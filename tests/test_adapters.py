import pytest
import torch

from lightning_ipa import Adapter, AdapterConfig, LocalBase
from lightning_ipa.bases import resolve_pretrained


def test_vocabulary_mismatch_fails_at_start_up_with_both_sizes(tiny_llama, tiny_gpt2_other_vocab):
    base = LocalBase(tiny_llama, dtype="float32")
    with pytest.raises(ValueError) as error:
        Adapter.build(AdapterConfig(name_or_path=tiny_gpt2_other_vocab), base)
    message = str(error.value)
    assert f"{len(base.tokenizer)} tokens" in message and "300 tokens" in message


def test_truncated_adapter_keeps_the_bases_first_layers(tiny_llama):
    base = LocalBase(tiny_llama, dtype="float32")
    adapter = Adapter.build(AdapterConfig(num_layers=2, head="zeros"), base)
    assert len(adapter.body.layers) == 2
    for layer in range(2):
        assert torch.equal(adapter.body.layers[layer].mlp.up_proj.weight, base.lm.model.layers[layer].mlp.up_proj.weight)
    assert (adapter.head.weight == 0).all()
    assert adapter.head.weight.data_ptr() != adapter.body.embed_tokens.weight.data_ptr()  # untied
    assert not adapter.body.embed_tokens.weight.requires_grad
    pretrained = Adapter.build(AdapterConfig(num_layers=None, head="pretrained"), base)
    assert len(pretrained.body.layers) == 3
    assert torch.equal(pretrained.head.weight, base.lm.lm_head.weight)
    assert pretrained.head.weight.requires_grad  # tied to the input embeddings, which then train too


def test_projection_head_starts_at_zero_and_trains_only_the_projection(tiny_llama):
    base = LocalBase(tiny_llama, dtype="float32")
    adapter = Adapter.build(AdapterConfig(head="projection"), base)
    projection, output = adapter.head.projection, adapter.head.lm_head
    trainable = [p for p in adapter.head.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is projection.weight and projection.weight.shape == (32, 32)
    assert torch.equal(output.weight, base.lm.lm_head.weight) and not output.weight.requires_grad
    assert (adapter.head(torch.randn(4, 32)) == 0).all()


def test_projection_heads_frozen_copy_runs_in_the_bases_dtype_and_leaves_embeddings_trainable(tiny_llama):
    base = LocalBase(tiny_llama, dtype="bfloat16")
    adapter = Adapter.build(AdapterConfig(head="projection", train_embeddings=True), base)
    assert adapter.head.lm_head.weight.dtype == torch.bfloat16 and adapter.head.projection.weight.dtype == torch.float32
    embeddings = adapter.body.embed_tokens.weight
    assert embeddings.requires_grad and embeddings.dtype == torch.float32  # untied from the frozen head copy
    with torch.no_grad():
        adapter.head.projection.weight.copy_(torch.eye(32))
    hidden = torch.randn(4, 32, requires_grad=True)
    adapter.head(hidden).float().sum().backward()
    assert hidden.grad is not None and adapter.head.projection.weight.grad is not None


def test_adapter_from_its_own_checkpoint_with_the_same_tokenizer(tiny_llama):
    base = LocalBase(tiny_llama, dtype="float32")
    adapter = Adapter.build(AdapterConfig(name_or_path=tiny_llama, num_layers=1), base)
    assert len(adapter.body.layers) == 1


def test_resolve_pretrained_errors_are_clear(tmp_path):
    assert resolve_pretrained("gpt2") == "gpt2"  # hub names pass through untouched
    with pytest.raises(FileNotFoundError, match="not_a_package_xyz"):
        resolve_pretrained("package://not_a_package_xyz/model.gguf")
    with pytest.raises(FileNotFoundError, match="no such file: .*missing.gguf"):
        resolve_pretrained(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="no such folder: .*no_model_here"):
        resolve_pretrained(str(tmp_path / "no_model_here"))  # a typo'd folder never reaches the hub
