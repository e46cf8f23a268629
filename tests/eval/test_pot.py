from vlmoe.eval.pot import extract_program, pot_answer


def test_extract_program_from_fenced_and_bare_code():
    assert extract_program("Here:\n```python\nx = 2\nprint(x * 3)\n```\nDone.") == "x = 2\nprint(x * 3)\n"
    assert extract_program("```\nprint(1)\n```") == "print(1)\n"
    assert extract_program("```python\nprint(5)") == "print(5)"  # cut off by max_new_tokens
    assert extract_program("a = [1, 2]\nprint(sum(a))") == "a = [1, 2]\nprint(sum(a))"
    assert extract_program("The answer is print(3) maybe") is None  # mentions print but is not code
    assert extract_program("45") is None


def test_pot_answer_scores_the_last_printed_line():
    ran = pot_answer("```python\nprint('table total:')\nprint(12.5 + 30)\n```")
    assert ran.answer == "42.5" and ran.result.status == "ok"
    assert pot_answer("45%").answer == "45%" and pot_answer("45%").result is None


def test_failing_or_hostile_programs_answer_nothing():
    assert pot_answer("```python\nprint(1 / 0)\n```").answer == ""
    hostile = pot_answer("```python\nimport os\nprint(os.listdir('/'))\n```")
    assert hostile.answer == "" and hostile.result.status == "forbidden"
    looping = pot_answer("```python\nwhile True:\n    pass\n```", timeout_s=0.5)
    assert looping.answer == "" and looping.result.status == "timeout"
