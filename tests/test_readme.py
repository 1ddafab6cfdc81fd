"""The README's code runs as written.

Every ```python block of README.md runs, in the README's order. The blocks of one ``##``
section share a namespace (a later block may continue an earlier one of its section); each
section starts from an empty namespace. They run in a temporary working directory holding
what the README assumes a user has: ``my-llama``, a checkpoint folder (a tiny random Llama
and a word-level tokenizer built offline with ``tokenizers``). A block right after an
``<!-- readme-test: skip (reason) -->`` line is not run (the test lists the skips). After
each section, a few checks say the code did what its comments say, and the rules its
examples registered are removed.

``bash`` blocks are not run; their scripts and flags must exist (``--help``), and the test
command of the set-up block must be the one ``.ci/run`` runs. Every repository path the
README names must exist.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import dlbhooks as dlb
from dlbhooks.rules import registry

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((.+?)\)\s*-->")


@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the block's first code line
    section: str
    skip: str | None


def blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, with their ``##`` section."""
    out: list[Block] = []
    lines = text.splitlines()
    section, i = "(top)", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence:
            lang, start = fence.group(1), i + 1
            end = start
            while not lines[end].startswith("```"):
                end += 1
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            skip = SKIP.search(prev)
            out.append(Block(lang, "\n".join(lines[start:end]) + "\n", start + 1, section,
                             skip.group(1) if skip else None))
            i = end
        i += 1
    return out


BLOCKS = blocks(README.read_text())
PY_SECTIONS = list(dict.fromkeys(b.section for b in BLOCKS if b.lang == "python"))


def test_readme_blocks_found() -> None:
    langs = [b.lang for b in BLOCKS]
    assert langs.count("python") >= 7 and "bash" in langs
    assert "" in langs  # the layout tree
    assert set(langs) <= {"python", "bash", ""}, langs
    skipped = [(b.line, b.skip) for b in BLOCKS if b.skip]
    print(f"\nREADME: {langs.count('python')} python blocks, skipped: {skipped or 'none'}")
    assert all(b.lang == "python" for b in BLOCKS if b.skip)


def make_checkpoint(folder: Path) -> None:
    """A tiny random Llama (4 layers) and a word-level tokenizer whose words carry the
    SentencePiece marker (``▁Paris``), saved with ``save_pretrained``: no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    text = ["The capital of France is Paris", "The capital of Italy is Rome"]
    tok.train_from_iterator(text, trainers.WordLevelTrainer(
        special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(folder)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    make_checkpoint(root / "my-llama")
    return root


def check_quick_start(ns: dict) -> None:
    assert ns["exp"].positive is not None  # the last explanation is the contrastive one
    assert ns["exp"].inputs["input"].shape == ns["x"].shape
    assert Path("e.safetensors").is_file()


def check_coverage(ns: dict) -> None:
    exp = ns["exp"]
    assert {"0", "0.body.0", "1", "2"} <= set(exp.layers)  # the custom rules' paths
    assert exp.conservation_error() < 1e-5


def check_transformers(ns: dict) -> None:
    assert ns["tokenizer"].convert_tokens_to_ids("▁Paris") != ns["tokenizer"].unk_token_id
    assert ns["exp"].inputs["input_ids"].shape == ns["inputs"]["input_ids"].shape
    assert ns["exp"].heads["model.layers.3.self_attn"].shape == (1, 4)


def check_moe(ns: dict) -> None:
    assert ns["stats"].explanations == 3
    assert torch.isfinite(ns["loss"])
    E = ns["model"].config.num_experts
    assert ns["small"].config.num_experts == E - len(ns["stats"].least(0.25)["model.layers.2.mlp"])
    assert Path("pruned-model", "pruned_experts.json").is_file()


def check_faithfulness(ns: dict) -> None:
    assert ns["result"].delta.shape == (4,) and torch.isfinite(ns["result"].delta).all()
    assert ns["r"].shape == ns["x"].shape


def check_large_models(ns: dict) -> None:
    assert 0 < ns["dlb"].record_bytes(ns["tape"])
    assert torch.isfinite(ns["exp"].inputs["input_ids"]).all()


CHECKS = {"Quick start": check_quick_start, "Coverage": check_coverage,
          "Transformers and LLMs": check_transformers,
          "Mixture-of-Experts: expert relevance, corpus statistics, pruning": check_moe,
          "Faithfulness: is the relevance on the inputs that matter?": check_faithfulness,
          "Large models: device maps, offloading, memory": check_large_models}


def test_every_python_section_has_a_check() -> None:
    assert set(PY_SECTIONS) == set(CHECKS), PY_SECTIONS


@pytest.mark.parametrize("section", PY_SECTIONS)
def test_readme_python_section_runs(section: str, workdir: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    ns: dict = {"__name__": "__readme__"}
    rules_before = set(registry._BY_NAME)
    ran = 0
    try:
        for b in BLOCKS:
            if b.lang != "python" or b.section != section or b.skip:
                continue
            # padded so that a traceback names the README's own line numbers
            exec(compile("\n" * (b.line - 1) + b.code, str(README), "exec"), ns)
            ran += 1
        if not ran:
            pytest.skip(f"every block of {section!r} is marked skip")
        CHECKS[section](ns)
    finally:  # the examples' rules (MyScale, "mypkg.modeling.MyDecoderLayer") go
        for key in set(registry._BY_NAME) - rules_before:
            dlb.unregister_rule(key)


def test_setup_test_command_is_the_ci_command() -> None:
    setup = next(b for b in BLOCKS if b.lang == "bash")
    commands = [ln for ln in setup.code.splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(commands) == 2 and "pytest -q -rs" in commands[1], commands
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci, "README set-up command 2 differs from .ci/run's test command"


def _helps(cmds: list[list[str]]) -> list[str]:
    """The ``--help`` output of each command (run side by side)."""
    procs = [subprocess.Popen(cmd + ["--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT) for cmd in cmds]
    outs = []
    for cmd, proc in zip(cmds, procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (cmd, err[-2000:])
        outs.append(out)
    return outs


def test_commands_name_existing_scripts_and_flags() -> None:
    """``accelerate launch ... script flags`` and ``python script flags`` in the README's
    bash blocks and inline code: the script exists and accepts every flag."""
    text = README.read_text()
    spans = [b.code.replace("\\\n", " ") for b in BLOCKS if b.lang == "bash"]
    spans += re.findall(r"`([^`\n]+)`", text)
    uses: dict[str, set[str]] = {}
    launch: set[str] = set()
    for span in spans:
        for line in span.splitlines():
            cli = re.search(r"(?:^|-m )dlbhooks(?:\.cli)? ([a-z-]+)(.*)", line)
            if cli:  # the console script: python -m dlbhooks.cli <command>
                uses.setdefault(f"-m dlbhooks.cli {cli.group(1)}", set()).update(
                    re.findall(r"--[\w-]+", cli.group(2)))
                if "accelerate launch" in line:
                    launch.update(re.findall(r"--[\w-]+", line[:cli.start()]))
            m = re.search(r"((?:scripts|examples)/\w+\.py)(.*)", line)
            if m:
                uses.setdefault(m.group(1), set()).update(re.findall(r"--[\w-]+", m.group(2)))
                if "accelerate launch" in line:
                    launch.update(re.findall(r"--[\w-]+", line[:m.start()]))
    assert "--cpu" in uses["-m dlbhooks.cli experts"]  # (the launched command's flags)
    assert launch >= {"--multi_gpu", "--num_processes"}
    assert "--model" in uses["-m dlbhooks.cli demo"]  # dlbhooks demo --model digits
    assert all((ROOT / script).is_file() for script in uses if script.endswith(".py")), uses
    flagged = {script: flags for script, flags in uses.items() if flags}
    cmds = [[sys.executable, *script.split()] for script in flagged]
    cmds.append([sys.executable, "-m", "accelerate.commands.launch"])
    helps = _helps(cmds)
    for (script, flags), usage in zip([*flagged.items(), ("accelerate launch", launch)], helps):
        unknown = {f for f in flags if f not in re.findall(r"--[\w-]+", usage)}
        assert not unknown, (script, unknown)


def test_named_paths_exist() -> None:
    text = README.read_text()
    paths = set(re.findall(r"(?<![\w/.])((?:scripts|examples|tests|docs|dlbhooks)/[\w/.-]*\w)",
                           text))
    paths |= {"docs/" + p for p in re.findall(r"\]\(docs/([\w.-]+)\)", text)}
    assert len(paths) > 10
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing
