"""Fixtures shared by the test modules."""
import pytest
import torch


@pytest.fixture(scope="session")
def tiny():
    """A real (random-weight) chat model: tokenizer trained on ABC from music21's corpus."""
    from music21 import corpus

    from imelodist_lib.models import new_tiny_model, train_tokenizer

    texts = [p.read_text(encoding="latin-1")[:20000] for p in corpus.getPaths(fileExtensions=("abc",))[:30]]
    tokenizer = train_tokenizer(texts + ["你是专业的音乐作曲家 IMelodist 请创作一首曲子"], vocab_size=512)
    model = new_tiny_model(tokenizer, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=128)
    # a model this small decodes fastest on one thread; more threads only contend on shared CI cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model, tokenizer
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def internlm2_checkpoint(tmp_path_factory):
    """A tiny random InternLM2 in the hub's exact layout (2 safetensors shards, remote-code files that
    raise if imported), with a SentencePiece tokenizer.model trained on our zh/en/ABC text."""
    from internlm2_reference import knowledge_texts, oneills_tunes

    from imelodist_lib.internlm2 import train_sentencepiece_model, write_internlm2_checkpoint

    root = tmp_path_factory.mktemp("internlm2")
    # character_coverage below 1 leaves rare characters to byte fallback, as in the real vocabulary
    model = train_sentencepiece_model(knowledge_texts() + oneills_tunes()[:300], root / "tokenizer.model",
                                      vocab_size=2000, character_coverage=0.98)
    return write_internlm2_checkpoint(root / "internlm2-tiny", model, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                      shards=2)


@pytest.fixture(scope="session")
def internlm2_converted(internlm2_checkpoint, tmp_path_factory):
    """The fixture InternLM2 converted once into a plain Llama folder (fast tokenizer, no auto_map)."""
    from imelodist_lib.internlm2 import ensure_llama_checkpoint

    return ensure_llama_checkpoint(internlm2_checkpoint, cache_dir=tmp_path_factory.mktemp("converted"))


@pytest.fixture(scope="module")
def composer():
    """The shipped IMelodist-tiny behind a transformers Composer, on one thread (one per module)."""
    from imelodist_lib.inference import Composer
    from imelodist_lib.profiles import SHIPPED_MODEL_DIR

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Composer(str(SHIPPED_MODEL_DIR), backend="transformers", cpu_threads=1)
    torch.set_num_threads(threads)
