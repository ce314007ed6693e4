"""The `llama.cpp` loader: GGUF files of any architecture llama.cpp knows, run by llama-cpp-python.

llama.cpp reads every GGUF quant type and architecture with hand-tuned CPU kernels and offloads layers to a GPU.
Detection scores it above the `gguf` loader for the files Hearth's engine cannot run, and below it for the ones
it runs: on 2 CPU cores llama.cpp decodes the default model's Q4_1 file faster, but its products round every
activation to 8 bits (a scale per 32 values, Q8_1/Q8_0) against quantized weights, which moves logits by more
than the 0.08 between the golden reply's first two candidates, so greedy decoding does not answer "Paris" there
(on the same weights in F32 its logits are transformers' own: tests/test_llamacpp.py). It is picked by hand
(Model tab, saved per model) for those files.

Hearth keeps the prompt: it renders the GGUF's own chat template (prompts.templates reads it from the
metadata) with the GGUF's own vocabulary (loaders.llamacpp_tokenizer), and hands llama.cpp the token ids.
The decode loop is Hearth's: llama.cpp samples one token at a time, and Hearth turns it into text, holds back
what could be the start of a stop string and checks Stop between tokens.
"""
from __future__ import annotations

import dataclasses
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from core.folder import require_dir, safetensors_files
from core.options import option
from engine.generation import DoneEvent, GenerationEvent, StatsEvent, TextEvent
from engine.model import Model, Prompt, prompt_ids
from engine.sampling import GenerationParams
from engine.stopping import IncrementalDecoder, StopStringFilter
from loaders.base import Detection, LoadError, Progress, no_progress
from loaders.gguf_checkpoint import engine_refusal, unpacked_here
from loaders.gguf_header import model_files, read_model_header, split_parts
from loaders.gguf_loader import FILE_TYPES, pick_file
from loaders.llamacpp_install import state as build_state

# KV-cache element types llama.cpp accepts (ggml type names; quantized V needs flash_attn).
CACHE_TYPES = ["f16", "bf16", "f32", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"]
# 0 = the model's own context, but no more than this: a 128k-token KV cache would not fit most machines.
AUTO_CONTEXT_CAP = 16384


def auto_context(trained: int | None) -> tuple[int | None, str]:
    """n_ctx when the user sets none, and where it comes from: the GGUF's trained context, at most
    AUTO_CONTEXT_CAP (llama.cpp allocates the whole KV cache at load: gpt-oss's 131072 tokens would take
    gigabytes for a chat that uses a few thousand)."""
    if not trained:
        return None, ""
    if int(trained) > AUTO_CONTEXT_CAP:
        return AUTO_CONTEXT_CAP, (f"model (GGUF metadata: {int(trained)}, capped at {AUTO_CONTEXT_CAP} for "
                                  "llama.cpp's KV cache; set n_ctx for more)")
    return int(trained), "model (GGUF metadata)"


# The shared sampler's parameters llama.cpp's sampler chain takes (Hearth's name -> what maps it below).
MAPPED = {"max_new_tokens", "temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty",
          "repetition_penalty_range", "presence_penalty", "frequency_penalty", "seed", "stop"}


@dataclass
class LlamaCppOptions:
    gguf_file: str = option("", "Which model in the folder to load: a .gguf file name (for a split model, its "
                                "-00001-of-0000N part); empty = the first one.")
    context_length: int = option(0, f"Context length in tokens (llama.cpp's n_ctx); 0 = the model's own, at most "
                                    f"{AUTO_CONTEXT_CAP}.", minimum=0, maximum=1048576, step=256, label="n_ctx")
    n_gpu_layers: int = option(-1, "Layers to offload to the GPU; -1 = all, 0 = none (a CPU build of llama.cpp "
                                   "runs everything on the CPU).", minimum=-1, maximum=1000, step=1)
    n_threads: int = option(0, "CPU threads; 0 = as many as torch uses here (the physical cores).",
                            minimum=0, maximum=256, step=1)
    n_batch: int = option(512, "Prompt tokens evaluated per batch.", minimum=1, maximum=8192, step=1)
    flash_attn: bool = option(False, "Use flash attention (needed for a quantized V cache).")
    cache_type_k: str = option("f16", "KV cache type for keys; q8_0 halves the cache's memory.", choices=CACHE_TYPES)
    cache_type_v: str = option("f16", "KV cache type for values; quantized types need flash_attn.",
                               choices=CACHE_TYPES)
    use_mmap: bool = option(True, "Map the file instead of reading it into memory (loads instantly, shares pages).")
    use_mlock: bool = option(False, "Lock the model in RAM so the OS never swaps it out.")
    main_gpu: int = option(0, "The GPU that holds the model (or the scratch buffers when split).", minimum=0,
                           maximum=63, step=1)
    tensor_split: str = option("", "Share of the model on each GPU, e.g. 3,1; empty = llama.cpp decides.")


def _tensor_split(text: str) -> list[float] | None:
    if not text.strip():
        return None
    try:
        shares = [float(x) for x in text.split(",")]
    except ValueError:
        raise LoadError(f"tensor_split must be numbers separated by commas, e.g. 3,1; got {text!r}") from None
    if any(s < 0 for s in shares) or not any(s > 0 for s in shares):
        raise LoadError(f"tensor_split needs non-negative shares, one of them above 0; got {text!r}")
    return shares


def sampler_arguments(params: GenerationParams) -> dict:
    """llama-cpp-python's `generate` arguments for `params`. ValueError naming any parameter the shared sampler
    has that llama.cpp's chain is not given here, when it is set away from its default: never dropped silently."""
    defaults = type(params)()
    unmapped = [f.name for f in dataclasses.fields(params)
                if f.name not in MAPPED and getattr(params, f.name) != getattr(defaults, f.name)]
    if unmapped:
        raise ValueError(f"the llama.cpp loader cannot honour {', '.join(unmapped)}: reset "
                         f"{'it' if len(unmapped) == 1 else 'them'} to the default or use another loader")
    # llama.cpp's chain: penalties, top_k, typical, top_p, min_p, temperature, then the draw (greedy at 0).
    return {"temp": params.temperature, "top_k": params.top_k, "top_p": params.top_p, "min_p": params.min_p,
            "typical_p": params.typical_p, "repeat_penalty": params.repetition_penalty,
            "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty}


def compile_grammar(llm, grammar: str):
    """A LlamaGrammar for GBNF text; ValueError when llama.cpp cannot parse it (llama-cpp-python would hand
    llama.cpp's sampler chain a null sampler otherwise)."""
    import llama_cpp
    from llama_cpp import LlamaGrammar

    probe = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.encode("utf-8"), b"root")
    if not probe:
        raise ValueError("the GBNF grammar does not parse (llama.cpp's log says where); it needs a `root` rule")
    llama_cpp.llama_sampler_free(probe)
    return LlamaGrammar.from_string(grammar, verbose=False)


class LlamaCppModel(Model):
    takes_grammar = True      # generate(..., grammar=GBNF text) constrains the reply (the API's structured output)

    def __init__(self, model_dir: Path, path: Path, llm, context_length: int, runtime: str) -> None:
        from loaders.llamacpp_tokenizer import LlamaCppTokenizer

        self.name = model_dir.name
        self.loader = LlamaCppLoader.name
        self.model_dir = model_dir
        self.path = path
        self.llm = llm
        self.context_length = context_length
        self.runtime = runtime
        self.tokenizer = LlamaCppTokenizer(llm)
        import llama_cpp

        vocab = llm._model.vocab
        # Every end-of-generation token (ChatML's <|im_end|> as well as </s>), as llama.cpp marks them.
        self.eos_token_ids = tuple(i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i))
        self._lock = threading.Lock()   # one llama.cpp context: one generation at a time

    def generate(self, prompt: Prompt, params: GenerationParams, cancel: threading.Event | None = None,
                 grammar: str = "") -> Iterator[GenerationEvent]:
        t0 = time.perf_counter()
        ids = prompt_ids(prompt)
        seed = params.seed if params.seed >= 0 else random.randrange(2**32)
        stops = StopStringFilter(list(params.stop))
        decoder = IncrementalDecoder(self.tokenizer)
        parts: list[str] = []
        n_new, ttft, reason = 0, 0.0, "max_tokens"
        max_new = min(params.max_new_tokens, max(self.context_length - len(ids), 0))

        def finish(reason: str, error: str | None = None) -> Iterator[GenerationEvent]:
            tail = stops.flush()
            if tail:
                parts.append(tail)
                yield TextEvent(tail)
            elapsed = time.perf_counter() - t0
            decode_time = elapsed - ttft
            yield StatsEvent(prompt_tokens=len(ids), new_tokens=n_new, seconds=elapsed, time_to_first_token=ttft,
                             tokens_per_second=(n_new - 1) / decode_time if n_new > 1 and decode_time > 0 else 0.0)
            yield DoneEvent(reason=reason, text="".join(parts), stop_string=stops.stopped_on, error=error, seed=seed)

        try:
            arguments = sampler_arguments(params)
            compiled = compile_grammar(self.llm, grammar) if grammar else None
        except ValueError as exc:
            yield from finish("error", str(exc))
            return
        if max_new <= 0 or (cancel is not None and cancel.is_set()):
            yield from finish("max_tokens" if max_new <= 0 else "cancelled")
            return
        eos = set(self.eos_token_ids)
        with self._lock:
            # llama.cpp's seed is 32-bit; larger seeds of the shared sampler fold onto it, reproducibly.
            self.llm.set_seed(seed % 2**32)
            # Penalties look back over this many tokens; Hearth's 0 ("all") is the whole context.
            self.llm.last_n_tokens_size = params.repetition_penalty_range or self.context_length
            tokens = self.llm.generate(ids, grammar=compiled, **arguments)
            try:
                for token in tokens:
                    if n_new == 0:
                        ttft = time.perf_counter() - t0
                    n_new += 1
                    if token in eos:
                        reason = "eos"
                        break
                    shown = stops.push(decoder.push(token))
                    if shown:
                        parts.append(shown)
                        yield TextEvent(shown)
                    if stops.stopped_on is not None:
                        reason = "stop_string"
                        break
                    if n_new >= max_new:
                        reason = "max_tokens"
                        break
                    if cancel is not None and cancel.is_set():
                        reason = "cancelled"
                        break
            except Exception as exc:   # llama.cpp failed mid-reply (e.g. the context filled): keep the text so far
                tokens.close()
                yield from finish("error", f"{type(exc).__name__}: {exc}")
                return
            tokens.close()
        yield from finish(reason)

    def unload(self) -> None:
        self.llm.close()


class LlamaCppLoader:
    name = "llama.cpp"
    description = ("GGUF files of any architecture llama.cpp runs (llama-cpp-python, built on this machine): every "
                   "quant type, CPU kernels, GPU offload, KV-cache quantization, GBNF grammars. Picked for GGUF "
                   "files Hearth's engine cannot run.")
    options_type = LlamaCppOptions

    def unavailable(self) -> str | None:
        """Why this loader cannot load anything now (llama-cpp-python building, failed, no compiler), or None."""
        current = build_state()
        return None if current.ready else current.line

    def detect(self, model_dir: Path) -> Detection | None:
        files = model_files(model_dir)
        if not files or self.unavailable():
            return None
        header = read_model_header(files[0])   # LoadError for a damaged file: the registry reports it
        meta = header.metadata
        arch = meta.get("general.architecture")
        file_type = meta.get("general.file_type")
        refusal = engine_refusal(header)
        unpacked = unpacked_here(header) if refusal is None else []
        if unpacked:
            # Quantized weights stay quantized: llama.cpp keeps every type packed, and is faster on CPU too.
            score, why = 0.7, (f"on this CPU Hearth's engine would unpack its {', '.join(unpacked)} tensors (no "
                               "packed CPU kernel for them); llama.cpp keeps every type packed")
        elif refusal is None:
            # Hearth's engine (the gguf loader) runs it: llama.cpp is the alternative. Measured on CPU, llama.cpp
            # is faster, but its 8-bit activations change the default model's greedy reply (module docstring).
            score, why = 0.4, ("Hearth's engine (the gguf loader) runs this architecture and type with exact "
                               "activations; llama.cpp, faster on CPU, rounds them to 8 bits (pick it in the "
                               "Model tab)")
        else:
            score, why = 0.7, f"Hearth's engine cannot run it ({refusal})"
        if safetensors_files(model_dir):
            score = 0.1     # the safetensors' own loader serves the folder
        more = f" (+{len(files) - 1} more)" if len(files) > 1 else ""
        file_name = FILE_TYPES.get(file_type, str(file_type)) if file_type is not None else "unknown type"
        trained = meta.get(f"{arch}.context_length") if arch else None
        context, source = auto_context(trained)
        return Detection(self.name, score, f"GGUF {file_name} {arch or 'model'} ({files[0].name}{more}); {why}",
                         {"gguf": {"architecture": arch, "file_type": file_name, "context_length": context,
                                   "context_source": source, "trained_context_length": trained,
                                   "file": files[0].name, "files": [f.name for f in files]}})

    def load(self, model_dir: Path, options: LlamaCppOptions, progress: Progress = no_progress) -> Model:
        require_dir(model_dir)
        why = self.unavailable()
        if why:
            raise LoadError(f"the llama.cpp loader is not ready: {why}")
        chosen = pick_file(model_dir, options.gguf_file)
        split_parts(chosen)                     # a missing part is named before llama.cpp sees the file
        progress(0.05, f"reading the header of {chosen.name}")
        meta = read_model_header(chosen).metadata
        arch = meta.get("general.architecture")
        trained = meta.get(f"{arch}.context_length") if arch else None
        context = options.context_length or auto_context(trained)[0] or 2048
        type_k, type_v = (_ggml_type(options.cache_type_k), _ggml_type(options.cache_type_v))
        progress(0.1, f"llama.cpp is opening {chosen.name}")
        from llama_cpp import Llama, llama_supports_gpu_offload

        # llama-cpp-python's own default is half the logical CPUs: one thread on a 2-core machine.
        threads = options.n_threads or torch.get_num_threads()

        try:
            llm = Llama(model_path=str(chosen), n_ctx=context, n_batch=options.n_batch,
                        n_threads=threads, n_threads_batch=threads, n_gpu_layers=options.n_gpu_layers,
                        main_gpu=options.main_gpu, tensor_split=_tensor_split(options.tensor_split),
                        flash_attn=options.flash_attn, type_k=type_k, type_v=type_v, use_mmap=options.use_mmap,
                        use_mlock=options.use_mlock, verbose=False)
        except Exception as exc:  # llama.cpp reports an unknown architecture or a bad file as a failed load
            raise LoadError(f"llama.cpp could not load {chosen.name} ({arch or 'unknown architecture'}): "
                            f"{exc}; llama.cpp {'' if arch else 'found no architecture in the file, '}"
                            f"logs the details on stderr") from None
        offload = llama_supports_gpu_offload() and options.n_gpu_layers != 0
        progress(1.0, "ready")
        return LlamaCppModel(model_dir, chosen, llm, context,
                             f"llama.cpp ({'GPU offload' if offload else 'cpu'}, {chosen.name}, n_ctx {context})")


def _ggml_type(name: str) -> int:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType[name.upper()].value
    except KeyError:
        raise LoadError(f"unknown KV cache type {name!r}; the choices are {', '.join(CACHE_TYPES)}") from None
