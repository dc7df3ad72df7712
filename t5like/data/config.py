"""Data configuration: one typed dataclass, checked before any slow work starts."""
from __future__ import annotations

import dataclasses
import os
import re
import typing

SOURCES = ("stdlib", "files", "hub")
FORMATS = ("text", "json", "jsonl", "parquet", "csv")
OBJECTIVES = ("lm", "prefix_lm", "span_corruption", "mlm", "seq2seq", "completion", "classification", "sft", "dpo")
# Post-training objectives (t5like.data.instruct): JSONL records, read line by line so errors name file:line.
CHAT_OBJECTIVES = ("sft", "dpo")


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """A named held-out set, evaluated at every eval beside the run's own split: eval/<name>/loss, eval/<name>/bpb.
    Its documents come in the same forms as training data (data.source and the fields that go with it)."""

    name: str                      # letters, digits, _ . -: the metric rows are eval/<name>/...
    source: str = "files"          # stdlib | files | hub
    paths: tuple[str, ...] = ()    # files: files, directories or globs; hub: optional data_files
    format: str = "text"           # files: text | json | jsonl | parquet | csv
    text_field: str = "text"
    hub_name: str = ""
    hub_config: str = ""
    hub_split: str = "validation"  # hub: the split read
    split: str = "all"             # stdlib/files: "all" documents, or the run's "validation" share of them
    max_files: int = 0
    max_batches: int = 0           # batches per eval (of train.batch_size rows); 0 = train.eval_steps

    def __post_init__(self):
        _paths_as_tuple(self)

    def data_config(self, data: "DataConfig") -> "DataConfig":
        """The run's data config (tokenizer, objective, lengths) reading this set's documents."""
        return dataclasses.replace(data, source=self.source, paths=self.paths, format=self.format,
                                   text_field=self.text_field, hub_name=self.hub_name, hub_config=self.hub_config,
                                   hub_validation_split=self.hub_split, max_files=self.max_files, eval_sets=(),
                                   mixture=(), mixture_stages=())

    def iterator_split(self) -> str:
        """The split make_iterator reads: a hub set's hub_split is its "validation"; local sources "all" or it."""
        return "validation" if self.source == "hub" else self.split


def _paths_as_tuple(source) -> None:
    """A frozen source's `paths` as a tuple (a config file or override may give one string or a list)."""
    if isinstance(source.paths, (list, str)):
        object.__setattr__(source, "paths", (source.paths,) if isinstance(source.paths, str) else tuple(source.paths))


_EVAL_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class MixtureSource:
    """One named source of a weighted mixture (data.mixture), in any form a single source takes.

    Its share of the training rows is weight / (the sum of the weights) until a stage (data.mixture_stages)
    changes it. With eval=True its held-out documents are also an eval set: eval/<name>/loss, eval/<name>/bpb."""

    name: str                      # letters, digits, _ . -
    weight: float = 1.0            # >= 0; relative to the other sources' weights
    source: str = "stdlib"         # stdlib | files | hub
    paths: tuple[str, ...] = ()
    format: str = "text"
    text_field: str = "text"
    hub_name: str = ""
    hub_config: str = ""
    hub_split: str = "train"
    hub_validation_split: str = "validation"
    max_files: int = 0
    eval: bool = True              # also report this source's held-out documents by name

    def __post_init__(self):
        _paths_as_tuple(self)

    def data_config(self, data: "DataConfig") -> "DataConfig":
        """The run's data config (tokenizer, objective, lengths, split) reading this source alone."""
        return dataclasses.replace(data, source=self.source, paths=self.paths, format=self.format,
                                   text_field=self.text_field, hub_name=self.hub_name, hub_config=self.hub_config,
                                   hub_split=self.hub_split, hub_validation_split=self.hub_validation_split,
                                   max_files=self.max_files, eval_sets=(), mixture=(), mixture_stages=())

    def eval_set(self) -> EvalSet:
        """This source's held-out share as a named eval set (a hub source: its validation split)."""
        return EvalSet(name=self.name, source=self.source, paths=self.paths, format=self.format,
                       text_field=self.text_field, hub_name=self.hub_name, hub_config=self.hub_config,
                       hub_split=self.hub_validation_split, split="validation", max_files=self.max_files)


@dataclasses.dataclass(frozen=True)
class MixtureStage:
    """From training step `start` on, the mixture's weights are `weights` (source name -> weight; a source
    not named gets 0)."""

    start: int
    weights: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DataConfig:
    """Where the text comes from, how it is tokenised and what the model is trained to predict.

    Errors name fields as `data.<field>`, the name the trainer's config gives this dataclass.
    """

    # Where the documents come from.
    source: str = "stdlib"  # stdlib: the Python standard library's .py files (offline, every machine has them)
    paths: tuple[str, ...] = ()  # source="files": files, directories or globs; source="hub": optional data_files
    format: str = "text"  # source="files": text (one file = one document) | json | jsonl | parquet | csv
    text_field: str = "text"  # column holding the document text (json/jsonl/parquet/csv and hub)
    hub_name: str = ""  # source="hub": anything datasets.load_dataset accepts ("allenai/c4", or "json" + paths)
    hub_config: str = ""  # source="hub": the dataset's configuration, e.g. "en" for allenai/c4
    hub_split: str = "train"  # source="hub": the split trained on
    hub_validation_split: str = "validation"  # source="hub": the split evaluated on
    streaming: bool = True  # hub only: stream instead of downloading the whole dataset first
    shuffle_buffer: int = 10_000  # hub only: documents in the streaming shuffle buffer
    cache_dir: str = ""  # HF datasets cache for loaded/tokenised local data; "" = the HF default
    max_files: int = 0  # cap on the number of files read (stdlib/files); 0 = all
    validation_fraction: float = 0.02  # documents held out for source=stdlib/files, chosen by hash

    # Tokenizer.
    tokenizer_path: str = ""  # a SentencePiece .model, or a Hugging Face tokenizer's directory; "" = train one into WORKDIR/tokenizer/
    tokenizer_train_chars: int = 5_000_000  # text used to train SentencePiece (~20 s on 2 cores)
    num_sentinels: int = 100  # ids reserved at the top of the vocab (T5 sentinels; the first is MLM's mask)

    # What each row of a batch is.
    # Fine-tuning tasks (t5like.data.tasks) read JSONL examples from data.paths: seq2seq (input/target),
    # completion (prompt/completion, loss on the completion), classification (text/label);
    # sft (chat `messages` or instruction/input/output, loss on assistant turns) and dpo (prompt/chosen/rejected).
    objective: str = "lm"
    seq_len: int = 128  # decoder length (lm, prefix_lm, completion) or encoder length (span_corruption, mlm, seq2seq)
    target_len: int = 0  # decoder length: span_corruption (0 = derive from noise_density as T5 does), seq2seq (0 = seq_len)
    noise_density: float = 0.15  # span_corruption: fraction of tokens masked
    mean_noise_span_length: float = 3.0  # span_corruption: mean length of a masked span
    mlm_probability: float = 0.15  # mlm: fraction of tokens predicted

    shuffle: bool = True  # shuffle the training rows (each epoch in a new order)
    # Named held-out sets (EvalSet), each with its own eval/<name>/loss and eval/<name>/bpb rows at every eval.
    # On the command line: a JSON list, data.eval_sets='[{"name": "code", "source": "files", "paths": ["x/*.py"]}]'.
    eval_sets: tuple[EvalSet, ...] = ()
    # A weighted mixture of named sources (MixtureSource) instead of data.source; on the command line a JSON
    # list, data.mixture='[{"name": "code", "source": "files", "paths": ["x/*.py"], "weight": 3}, ...]'.
    mixture: tuple[MixtureSource, ...] = ()
    # Weights that change from a given step on (MixtureStage); a JSON list,
    # data.mixture_stages='[{"start": 1000, "weights": {"code": 1, "web": 3}}]'.
    mixture_stages: tuple[MixtureStage, ...] = ()
    # Processes for datasets.map when tokenising local data. SentencePiece already encodes each batch on
    # all cores, and >1 forks a process that may have JAX running, so raise it only for big corpora.
    num_proc: int = 1

    def __post_init__(self):
        # Configs often come from JSON/YAML/argparse, which give lists.
        if isinstance(self.paths, list):
            self.paths = tuple(self.paths)
        if isinstance(self.eval_sets, (list, tuple)):  # from JSON (config.json, the command line): dicts
            self.eval_sets = tuple(EvalSet(**s) if isinstance(s, dict) else s for s in self.eval_sets)
        if isinstance(self.mixture, (list, tuple)):
            self.mixture = tuple(MixtureSource(**s) if isinstance(s, dict) else s for s in self.mixture)
        if isinstance(self.mixture_stages, (list, tuple)):
            self.mixture_stages = tuple(MixtureStage(**s) if isinstance(s, dict) else s for s in self.mixture_stages)

    @property
    def host_count_invariant(self) -> bool:
        """Every host reads every document (local sources), so the saved position holds on any host count."""
        return all(s.source != "hub" for s in self.mixture) if self.mixture else self.source != "hub"

    def named_eval_sets(self) -> tuple[EvalSet, ...]:
        """data.eval_sets, then the held-out share of each mixture source with eval=True."""
        return self.eval_sets + tuple(s.eval_set() for s in self.mixture if s.eval)

    def stage_weights(self) -> list[tuple[int, tuple[float, ...]]]:
        """[(first step, the normalised weight of every mixture source in order)], the sources' own from step 1."""
        names = [s.name for s in self.mixture]
        stages = [(1, [float(s.weight) for s in self.mixture])]
        stages += [(st.start, [float(st.weights.get(n, 0.0)) for n in names]) for st in self.mixture_stages]
        return [(start, tuple(w / sum(ws) for w in ws)) for start, ws in stages]

    def validate(self) -> "DataConfig":
        """Raise ValueError/FileNotFoundError naming the first bad field; return self so calls chain."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, want = getattr(self, f.name), hints[f.name]
            if want is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            elif want is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif want in (str, bool):
                ok = isinstance(value, want)
            elif f.name in ("eval_sets", "mixture", "mixture_stages"):
                kind = {"eval_sets": EvalSet, "mixture": MixtureSource, "mixture_stages": MixtureStage}[f.name]
                ok = isinstance(value, tuple) and all(isinstance(s, kind) for s in value)
            else:  # tuple[str, ...]
                ok = isinstance(value, tuple) and all(isinstance(p, str) for p in value)
            if not ok:
                fix = "a tuple of path strings, e.g. ('data/*.txt',)" if f.name == "paths" else want.__name__
                raise ValueError(f"data.{f.name}={value!r} has the wrong type; expected {fix}")

        self._validate_mixture()  # first: a mixture replaces data.source and its fields
        _one_of("source", self.source, SOURCES)
        _one_of("format", self.format, FORMATS)
        _one_of("objective", self.objective, OBJECTIVES)
        if self.source == "files" and not self.paths and not self.mixture:
            raise ValueError("data.paths is empty but data.source='files'; set data.paths=('corpus/*.txt',) "
                             "or use data.source='stdlib'")
        if self.source == "hub" and not self.hub_name and not self.mixture:
            raise ValueError("data.hub_name is empty but data.source='hub'; set it, e.g. data.hub_name='allenai/c4'")
        if not self.text_field:
            raise ValueError("data.text_field is empty; set it to the column holding the text, e.g. 'text'")
        if self.tokenizer_path and not (os.path.isfile(self.tokenizer_path) or _is_hf_tokenizer(self.tokenizer_path)):
            raise FileNotFoundError(f"data.tokenizer_path={self.tokenizer_path!r} does not exist (as a file or a "
                                    "Hugging Face tokenizer directory); give an existing SentencePiece .model, a directory with "
                                    "tokenizer.json / spiece.model, or leave it empty to train one into WORKDIR/tokenizer/")

        _in_range("noise_density", self.noise_density, 0, 1)
        _in_range("mlm_probability", self.mlm_probability, 0, 1)
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"data.validation_fraction={self.validation_fraction} must be in [0, 1); try 0.02")
        if not 1 <= self.mean_noise_span_length < float("inf"):  # NaN fails this too
            raise ValueError(f"data.mean_noise_span_length={self.mean_noise_span_length} must be >= 1; T5 uses 3.0")
        for name, low in (("seq_len", 2), ("num_proc", 1), ("tokenizer_train_chars", 1), ("shuffle_buffer", 1),
                          ("max_files", 0), ("target_len", 0), ("num_sentinels", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"data.{name}={getattr(self, name)} must be >= {low}")
        if self.objective in ("span_corruption", "mlm") and self.num_sentinels < 1:
            raise ValueError(f"data.num_sentinels=0 but data.objective={self.objective!r} needs reserved ids "
                             "(sentinels / the mask id); set data.num_sentinels=100")
        if self.objective in ("seq2seq", "completion", "classification") and (
                self.source != "files" or self.format == "text"):
            raise ValueError(f"data.objective={self.objective!r} reads labelled examples from files: set "
                             "data.source='files', data.format='jsonl' and data.paths=('train.jsonl',); got "
                             f"data.source={self.source!r}, data.format={self.format!r}")
        if self.objective in CHAT_OBJECTIVES and (self.source != "files" or self.format != "jsonl"):
            raise ValueError(f"data.objective={self.objective!r} reads JSONL records: set data.source='files', "
                             "data.format='jsonl' and data.paths=('train.jsonl',); got "
                             f"data.source={self.source!r}, data.format={self.format!r}")
        if self.objective == "dpo" and self.seq_len % 2:
            raise ValueError(f"data.seq_len={self.seq_len} must be even for data.objective='dpo': a row holds the "
                             f"chosen and the rejected answer in a half each; set data.seq_len={self.seq_len + 1}.")
        if self.objective == "span_corruption":
            from t5like.data.objectives import span_corruption_lengths  # lazy: objectives imports nothing from here
            span_corruption_lengths(self)  # raises if seq_len/target_len/num_sentinels do not fit together
        self._validate_eval_sets()
        return self

    def _validate_mixture(self) -> None:
        if not self.mixture:
            if self.mixture_stages:
                raise ValueError("data.mixture_stages is set but data.mixture is empty; stages change the weights "
                                 "of a mixture's sources. Set data.mixture or remove data.mixture_stages.")
            return
        if self.paths or self.hub_name or self.source != "stdlib":
            raise ValueError(f"data.mixture is set, and so is data.source={self.source!r} / data.paths / "
                             "data.hub_name: a mixture names its own sources. Move the source into data.mixture as "
                             "one more named entry and leave data.source, data.paths and data.hub_name unset.")
        if self.objective in ("seq2seq", "completion", "classification"):
            raise ValueError(f"data.mixture mixes documents of text, for the text objectives; data.objective="
                             f"{self.objective!r} reads labelled examples. Remove data.mixture.")
        names = []
        for i, s in enumerate(self.mixture):
            where = f"data.mixture[{i}]"
            if not isinstance(s.name, str) or not _EVAL_SET_NAME.match(s.name):
                raise ValueError(f"{where}.name={s.name!r} must be letters, digits, '_', '.' or '-', e.g. 'code'.")
            if s.name in names:
                raise ValueError(f"{where}.name={s.name!r} is used twice; give every mixture source its own name.")
            names.append(s.name)
            _weight(f"{where}.weight", s.weight)
            if not isinstance(s.eval, bool):
                raise ValueError(f"{where}.eval={s.eval!r} must be true or false.")
            try:
                s.data_config(self).validate()
            except (ValueError, FileNotFoundError) as e:
                raise type(e)(f"{where} (name={s.name!r}): {str(e).replace('data.', where + '.')}") from None
        if sum(s.weight for s in self.mixture) <= 0:
            raise ValueError(f"data.mixture's weights are all zero ({[s.weight for s in self.mixture]}); give at "
                             "least one source a positive weight, e.g. weight=1.")
        last = 1
        for i, st in enumerate(self.mixture_stages):
            where = f"data.mixture_stages[{i}]"
            if not isinstance(st.start, int) or isinstance(st.start, bool) or st.start <= last:
                raise ValueError(f"{where}.start={st.start!r} must be an integer step after {last} (the previous "
                                 "stage's start; the sources' own weights hold from step 1): list stages in order "
                                 "of their start step.")
            last = st.start
            if not isinstance(st.weights, dict) or not st.weights:
                raise ValueError(f"{where}.weights={st.weights!r} must map source names to weights, e.g. "
                                 f"{{{names[0]!r}: 1.0}}.")
            for name, w in st.weights.items():
                if name not in names:
                    raise ValueError(f"{where}.weights names {name!r}, which is no source of data.mixture "
                                     f"(its sources are {names}); fix the name or add the source.")
                _weight(f"{where}.weights[{name!r}]", w)
            if sum(st.weights.values()) <= 0:
                raise ValueError(f"{where}.weights are all zero ({st.weights}); give a source a positive weight.")
        clash = set(names) & {s.name for s in self.eval_sets}
        if clash and any(s.eval for s in self.mixture if s.name in clash):
            raise ValueError(f"data.eval_sets and data.mixture both name {sorted(clash)[0]!r}, so eval/"
                             f"{sorted(clash)[0]}/loss would mean two things; rename one, or set eval=false on the "
                             "mixture source.")

    def _validate_eval_sets(self) -> None:
        names = set()
        for i, s in enumerate(self.eval_sets):
            where = f"data.eval_sets[{i}]"
            if not isinstance(s.name, str) or not _EVAL_SET_NAME.match(s.name):
                raise ValueError(f"{where}.name={s.name!r} must be letters, digits, '_', '.' or '-' (it names the "
                                 "metric rows eval/<name>/loss), e.g. name='code'.")
            if s.name in names:
                raise ValueError(f"{where}.name={s.name!r} is used twice; give every eval set its own name.")
            names.add(s.name)
            if s.split not in ("all", "validation"):
                raise ValueError(f"{where}.split={s.split!r} is not 'all' (every document of the source) or "
                                 "'validation' (the share the run holds out of it).")
            if self.objective in ("seq2seq", "completion", "classification", *CHAT_OBJECTIVES):
                raise ValueError(f"data.eval_sets are documents of text, for the text objectives; data.objective="
                                 f"{self.objective!r} reads labelled examples. Remove data.eval_sets.")
            if not isinstance(s.max_batches, int) or s.max_batches < 0:
                raise ValueError(f"{where}.max_batches={s.max_batches!r} must be an integer >= 0 (0: train.eval_steps).")
            try:
                s.data_config(self).validate()
            except (ValueError, FileNotFoundError) as e:
                raise type(e)(f"{where} (name={s.name!r}): {str(e).replace('data.', 'eval set ')}") from None


def _weight(where: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"{where}={value!r} must be a finite number >= 0 (NaN, infinite and negative weights "
                         "have no share); e.g. 1.0.")


def _is_hf_tokenizer(path: str) -> bool:
    from t5like.data.hf_tokenizer import has_tokenizer  # lazy: keeps this module light
    return os.path.isdir(path) and has_tokenizer(path)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"data.{name}={value!r} is not one of {allowed}")


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if not low < value < high:
        raise ValueError(f"data.{name}={value} must be strictly between {low} and {high}; T5/BERT use 0.15")
