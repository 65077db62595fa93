"""Models: the chat template, IMelodist-tiny (tokenizer + Llama config), loading, InternLM2 -> Llama.

Two model families share one interface:
- IMelodist-tiny: a ~5M-parameter Llama with a byte-level BPE tokenizer trained on our own
  continued-pretraining text, so the whole pipeline runs from zero on a laptop CPU.
- InternLM2-chat-7B (IMelodist's base): converted once to a plain Llama checkpoint and cached
  (`internlm2.ensure_llama_checkpoint`), then loaded like any Llama (4-bit NF4 for QLoRA); no code
  shipped with a checkpoint runs unless the caller passes trust_remote_code=True.
Both use the same InternLM2 chat format (`CHAT_TEMPLATE`), so prompts are byte-identical.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from imelodist_lib.profiles import SYSTEM_PROMPT, Profile

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END]

# InternLM2's chat format, with the IMelodist system prompt added when the conversation has none.
# `{% generation %}` marks the assistant's answer (and its closing <|im_end|>, so the model learns
# to stop) for `return_assistant_tokens_mask`: TRL's assistant_only_loss trains on exactly these
# tokens. The markers render to nothing, so inference sees the plain InternLM2 string.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{ message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{ '\\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Music-aware pre-tokenisation for IMelodist-tiny. BPE merges never cross a pre-token boundary,
# so each ABC note (accidentals, letter, octave marks, length), bar line, chord symbol "..."
# and tuplet marker is its own piece: tokens never straddle two notes, which keeps bar counting
# learnable. English words with a non-note letter stay whole (" the", " reel"); runs of
# note letters split into notes, a small price for prose such as "bed" or "cafe".
ABC_PRETOKENIZE_PATTERN = "|".join([
    r'"[^"\n]{0,24}"',                      # chord symbol / annotation: "Am7", "D/F#"
    r"![^!\s]{1,16}!",                      # decoration: !trill!
    r"\(\d(?::\d?){0,2}",                   # tuplet: (3  (3:2:3
    r"(?<![^\n])[A-Za-z]:",                 # header field at line start: K: M: T:
    r" ?[A-Za-z]*[H-Yh-wy][A-Za-z]*",       # a word containing a non-note letter
    r"[_^=]{0,2}[A-Ga-g][,']*\d*/*\d*",     # note: ^^c' _B, =F G3/2 A/
    r"[zZx]\d*/*\d*",                       # rest
    r"[|:\]]*\|[|:\]]*\d?|::|\[\|?\d?|\]",  # bar lines, repeats, endings, chord brackets
    r"\d+/\d+|\d+",                         # meters, lengths: 6/8 1/8 120
    r"\p{Han}+",                            # Chinese: BPE learns words inside the run
    r"[^\x00-\x7F\p{Han}]",                 # other non-ASCII (CJK punctuation, accents)
    r"\n|[ \t]+",
    r"[^\s\w]",                             # any other single symbol: ~ - > ( ) . ,
])


def _byte_level_pretokenizer(music_aware: bool):
    from tokenizers import Regex, pre_tokenizers

    if not music_aware:
        # GPT-2's rule: letters, digits and symbols split apart ("G2" -> "G", "2").
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(ABC_PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, music_aware: bool = True,
                    min_frequency: int = 2):
    """Train IMelodist-tiny's byte-level BPE tokenizer on the continued-pretraining text (no UNK)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer got no texts: pass the continued-pretraining 'text' column")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
                         f"{256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _byte_level_pretokenizer(music_aware)
    tok.decoder = decoders.ByteLevel()
    # keep the byte->unicode mapping only; offsets are not trimmed so decode is exact
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no UNK, ever
        show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return _wrap_tokenizer(tok)


def tokens_per_text(tokenizer, texts: Iterable[str]) -> float:
    """Mean number of tokens per text: the sequence-length cost of a tokenizer on a corpus."""
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    return sum(lengths) / max(1, len(lengths))


def _wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=IM_END, pad_token=PAD, unk_token=None,
        additional_special_tokens=[EOS, IM_START], model_max_length=4096,
        clean_up_tokenization_spaces=False)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def tiny_config(vocab_size: int, hidden_size: int = 256, num_hidden_layers: int = 6,
                num_attention_heads: int = 8, num_key_value_heads: int = 4,
                intermediate_size: int = 768, max_position_embeddings: int = 2048,
                bos_token_id: int | None = None, eos_token_id: int | None = None,
                pad_token_id: int | None = None):
    """IMelodist-tiny's LlamaConfig: InternLM2's shape (GQA, SwiGLU, RMSNorm, rotary), scaled down."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, use_cache=True)


def new_tiny_model(tokenizer, seed: int = 0, **sizes):
    """A freshly initialised IMelodist-tiny (LlamaForCausalLM) sized for `tokenizer`'s vocabulary."""
    from transformers import GenerationConfig, LlamaForCausalLM

    config = tiny_config(len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **sizes)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return model


def count_parameters(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def save_model(model, tokenizer, directory: str | Path) -> Path:
    """Save weights (safetensors), config, generation config and tokenizer with CHAT_TEMPLATE."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _offline_message(name: str) -> str:
    return (f"cannot download {name} here: download it elsewhere "
            f"(huggingface-cli download {name} --local-dir DIR) and pass DIR / "
            f"set IMELODIST_BASE_MODEL=DIR")


def bf16_supported(device: str) -> bool:
    """True where `device` computes in bfloat16 (CUDA: the GPU says; CPU: a bf16 matmul runs,
    natively with AVX512-BF16/AMX, else emulated by torch at fp32 speed or slower)."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    from transformers.utils import is_torch_bf16_available_on_device

    return is_torch_bf16_available_on_device(device)


def check_device(profile: Profile) -> None:
    """Refuse a CUDA profile on a machine without CUDA, naming the CPU rehearsal instead."""
    if profile.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"profile {profile.name!r} runs on device 'cuda' but this machine has no "
                           "CUDA GPU: set IMELODIST_DEVICE=cpu (or --set device=cpu) to rehearse the "
                           "same recipe on the CPU, or use the cpu profile")


def weights_kwargs(profile: Profile | None) -> dict:
    """from_pretrained's quantization, dtype and placement for the profile's device (no profile: {}).

    4-bit NF4 with double quantization and bf16 compute (QLoRA), through bitsandbytes on CUDA or
    on its CPU backend; bf16 weights where the device computes in bf16, else the checkpoint's."""
    if profile is None:
        return {}
    check_device(profile)
    bf16 = profile.bf16 and bf16_supported(profile.device)
    kwargs: dict = {}
    if profile.load_in_4bit:
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise ImportError("4-bit loading needs bitsandbytes: pip install bitsandbytes "
                              "(or use a profile with load_in_4bit=False)") from err
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32)
        # one full 4-bit copy per process: under `accelerate launch` each rank takes its own GPU
        kwargs["device_map"] = ({"": int(os.environ.get("LOCAL_RANK", 0))} if profile.is_gpu
                                else {"": profile.device})
    if bf16:
        kwargs["dtype"] = torch.bfloat16
    return kwargs


def model_source(path_or_id: str | Path, trust_remote_code: bool = False) -> tuple[str, bool]:
    """(folder to load, whether to run its code) for a dir or hub id: InternLM2 becomes its cached Llama copy.

    Anything that reloads a base model (e.g. to merge an adapter) should resolve it here too, so
    it reads the same converted weights and never runs checkpoint code unasked.
    """
    from imelodist_lib import internlm2

    name = str(path_or_id)
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{local} has no config.json: point at a saved model directory "
                                    "(the 'final' or 'merged' folder a training stage wrote)")
    elif _HUB_ID.match(name) and not name.startswith((".", "/", "~")) and not local.exists():
        local = internlm2.resolve_hub_id(name)
    else:
        raise FileNotFoundError(f"model directory {name} does not exist: train it first "
                                "(notebooks 02/03, python -m imelodist_lib.train) or pass a saved "
                                "model directory / hub id")
    if trust_remote_code:
        files = internlm2.remote_code_files(local)
        print(f"trust_remote_code=True: running code from {local}: {', '.join(files) or 'none named'}")
        return str(local), True
    if internlm2.is_internlm2_checkpoint(local):
        return str(internlm2.ensure_llama_checkpoint(local)), False
    return str(local), False  # an auto_map elsewhere is not run; transformers says if it is needed


def load_model(path_or_id: str | Path, profile: Profile | None = None, for_training: bool = False,
               trust_remote_code: bool = False):
    """Load (model, tokenizer) from a local dir or hub id, stored as the profile's device wants
    (`weights_kwargs`: 4-bit NF4 and/or bf16 when the profile asks).

    InternLM2 (model_type internlm2, local or hub) loads from its cached Llama copy
    (`internlm2.ensure_llama_checkpoint`). Code shipped with a checkpoint (auto_map) runs only
    when `trust_remote_code=True` is passed, which prints the files it will run.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(path_or_id)
    local = Path(name).expanduser()
    source, remote = model_source(name, trust_remote_code)

    kwargs: dict = {"trust_remote_code": remote, **weights_kwargs(profile)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=remote)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        if source == name and not local.exists():
            raise OSError(_offline_message(name)) from err
        raise
    tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        # InternLM2 ships no pad token; its EOS pads safely because padded labels are masked
        tokenizer.pad_token = tokenizer.eos_token
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if im_end is not None and im_end != tokenizer.unk_token_id:
        # chat answers end with <|im_end|>; generation must stop there
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if im_end not in eos:
            model.generation_config.eos_token_id = [im_end, *eos]
    if for_training:
        model.config.use_cache = False
        if "quantization_config" in kwargs:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=bool(profile and profile.gradient_checkpointing))
    else:
        model.eval()
    return model, tokenizer


# ---------------------------------------------------------------- InternLM2 -> Llama

# The converter lives in `imelodist_lib.internlm2`; these names stay importable from here.
_INTERNLM2_NAMES = {"convert_internlm2_to_llama", "convert_internlm2_state_dict",
                    "llama_config_from_internlm2", "split_wqkv", "ensure_llama_checkpoint"}


def __getattr__(name: str):
    if name in _INTERNLM2_NAMES:
        from imelodist_lib import internlm2

        return getattr(internlm2, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
