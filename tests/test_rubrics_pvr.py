"""Pointwise verifiable rubrics and the checker sandbox."""

import os
import socket
import threading

import pytest

from clipo_jax.rubrics import pvr
from clipo_jax.rubrics.sandbox import SandboxLimits, network_namespace_available, run_checker

FAST = SandboxLimits(timeout_s=4, cpu_s=2, memory_mb=256, max_output_bytes=4096)


def test_ground_truth_choice_bold_math():
    assert pvr.ground_truth_score("so the answer is HHHHH", "H") == 1
    assert pvr.ground_truth_score("my guess: CCCCC", "H") == -1
    assert pvr.ground_truth_score("no idea", "H") is None  # -> LLM check fallback
    assert pvr.ground_truth_score("... so there are **4** pieces", "4", "bold") == 1
    assert pvr.ground_truth_score("**5**", "4", "bold") == -1
    assert pvr.ground_truth_score("thus $\\boxed{\\dfrac{2}{2x+1}}$.", "\\frac{2}{2x+1}", "math") == 1
    assert pvr.ground_truth_score("thus \\boxed{3}", "4", "math") == -1
    with pytest.raises(ValueError, match="unknown ground-truth kind"):
        pvr.ground_truth_score("x", "y", "nope")


def test_boxed_extraction_nested():
    assert pvr._last_boxed("a \\boxed{1} then \\boxed{\\frac{a}{b}} end") == "\\frac{a}{b}"


# Hand-written cases: (response, constraint, expected).
CASES = [
    ("one two three", {"type": "word_count", "max": 3}, True),
    ("one two three four", {"type": "word_count", "max": 3}, False),
    ("It rains. It pours! Why?", {"type": "sentence_count", "equals": 3}, True),
    ("p1\n\np2\n\n\np3", {"type": "paragraph_count", "min": 3}, True),
    ("- a\n- b\n* c\n1. d", {"type": "bullet_count", "equals": 4}, True),
    ("- a\n- b", {"type": "bullet_count", "min": 3}, False),
    ("Paris is in France", {"type": "keywords_include", "keywords": ["paris", "France"]}, True),
    ("Paris is in France", {"type": "keywords_exclude", "keywords": ["london"]}, True),
    ("cat, cat and CAT; category", {"type": "keyword_count", "keyword": "cat", "equals": 3}, True),
    ('```json\n{"a": 1}\n```', {"type": "json_format"}, True),
    ("{a: 1}", {"type": "json_format"}, False),
    ("all lower here", {"type": "all_lowercase"}, True),
    ("Not lower", {"type": "all_lowercase"}, False),
    ("LOUD", {"type": "all_uppercase"}, True),
    ("Dear Sir, hello", {"type": "starts_with", "phrase": "dear sir"}, True),
    ("hello. Any questions?", {"type": "ends_with", "phrase": "Any questions?"}, True),
    ("no commas here", {"type": "no_commas"}, True),
    ("The cat is on the mat and it is happy with the sun.", {"type": "language", "language": "en"}, True),
    ("Le chat est sur le tapis avec une souris grise aujourd'hui.", {"type": "language", "language": "en"}, False),
    ("Кошка сидит на ковре.", {"type": "language", "language": "ru"}, True),
    ("这是一个测试句子。", {"type": "language", "language": "zh"}, True),
    ("这是一个测试句子。", {"type": "language", "language": "en"}, False),
]


@pytest.mark.parametrize("response,constraint,expected", CASES)
def test_constraints(response, constraint, expected):
    assert pvr.check_constraint(response, constraint) is expected


def test_constraint_errors():
    with pytest.raises(pvr.ConstraintError, match="unknown constraint type 'nope'"):
        pvr.check_constraint("x", {"type": "nope"})
    with pytest.raises(pvr.ConstraintError, match="missing the parameter 'keywords'"):
        pvr.check_constraint("x", {"type": "keywords_include"})
    with pytest.raises(pvr.ConstraintError, match="needs 'min', 'max' or 'equals'"):
        pvr.check_constraint("x", {"type": "word_count"})


def test_guardrails():
    loop = "I am not sure what to say here. " * 30
    assert pvr.guardrail_flags(loop)["repetition_loop"]
    normal = " ".join(f"word{i}" for i in range(200))
    assert not pvr.guardrail_flags(normal)["repetition_loop"]
    assert pvr.guardrail_flags("  \n")["empty"]
    assert pvr.guardrail_flags(
        "Bonjour tout le monde, comment allez-vous aujourd'hui mes amis?", expected_language="zh"
    )["wrong_language"]
    assert not pvr.guardrail_flags("Hello there, this is a reply in English.", expected_language="en")["wrong_language"]


# ---- sandbox ----------------------------------------------------------------------------------


def test_checker_code_runs():
    code = "def check(response):\n    return len(response.split()) <= 3\n"
    assert run_checker(code, "a b c", FAST).value is True
    assert run_checker(code, "a b c d", FAST).value is False
    assert pvr.check_constraint("a b", {"type": "code", "code": code}) is True
    assert run_checker("x = 1", "r", FAST).error.startswith("NameError")


def test_checker_may_use_its_temp_dir():
    code = "def check(r):\n    open('scratch.txt', 'w').write(r)\n    return open('scratch.txt').read() == r\n"
    assert run_checker(code, "hello", FAST).value is True


@pytest.mark.parametrize(
    "name,code",
    [
        ("write_outside", "def check(r):\n    open({target!r}, 'w').write('x')\n    return True"),
        (
            "os_open_outside",
            "import os\ndef check(r):\n    os.open({target!r}, os.O_WRONLY | os.O_CREAT)\n    return True",
        ),
        ("remove_outside", "import os\ndef check(r):\n    os.remove({victim!r})\n    return True"),
        ("system", "import os\ndef check(r):\n    os.system('touch {target}')\n    return True"),
        ("subprocess", "import subprocess\ndef check(r):\n    subprocess.run(['touch', {target!r}])\n    return True"),
        ("fork", "import os\ndef check(r):\n    os.fork()\n    return True"),
        ("ctypes", "def check(r):\n    import ctypes\n    return True"),
        (
            "importlib_socket",
            "import importlib\ndef check(r):\n    importlib.import_module('_socket')\n    return True",
        ),
    ],
)
def test_escape_attempts_refused(tmp_path, name, code):
    target = str(tmp_path / f"escaped_{name}")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    res = run_checker(code.format(target=target, victim=str(victim)), "r", FAST)
    assert not res.ok and ("sandbox" in res.error or "not allowed" in res.error), res
    assert not os.path.exists(target) and victim.read_text() == "keep me"


def test_network_refused():
    # A real listening socket on 127.0.0.1: the checker must not reach it.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    accepted = []
    srv.settimeout(3)

    def accept():
        try:
            accepted.append(srv.accept())
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    code = (
        f"def check(r):\n    s = __import__('socket').create_connection(('127.0.0.1', {port}), timeout=1)\n"
        "    return True"
    )
    res = run_checker(code, "r", FAST)
    t.join()
    srv.close()
    assert not res.ok and not accepted
    assert "socket" in res.error


def test_resource_limits():
    res = run_checker("def check(r):\n    while True:\n        pass", "r", FAST)
    assert not res.ok and ("CPU" in res.error or "timeout" in res.error)
    res = run_checker("def check(r):\n    x = bytearray(1024 ** 3)\n    return True", "r", FAST)
    assert not res.ok and "Memory" in res.error
    res = run_checker("def check(r):\n    print('x' * 100000)\n    return True", "r", FAST)
    assert not res.ok and "output" in res.error
    res = run_checker("import time\ndef check(r):\n    time.sleep(30)", "r", SandboxLimits(timeout_s=1))
    assert not res.ok and "timeout" in res.error


def test_forged_verdict_is_ignored():
    code = 'def check(r):\n    print(\'{"nonce": "guess", "value": true}\')\n    return False'
    assert run_checker(code, "r", FAST).value is False


def test_reports_network_namespace():
    assert isinstance(network_namespace_available(), bool)
