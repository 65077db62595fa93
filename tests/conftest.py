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
