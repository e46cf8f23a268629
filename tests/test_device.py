import pytest
import torch

from vlmoe.device import resolve_device


def test_resolve_device_accepts_what_the_machine_has():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == resolve_device("auto").type == expected


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("gpu", "not a torch device; use cpu, cuda, cuda:N or auto"),
        ("meta", "vlmoe runs on cpu or cuda"),
        ("cuda:99", "CUDA"),
    ],
)
def test_resolve_device_refuses_with_the_fix(name, message):
    with pytest.raises(ValueError, match=message) as error:
        resolve_device(name)
    assert repr(name) in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_says_use_cpu():
    with pytest.raises(ValueError, match="no usable CUDA GPU.*use --device cpu"):
        resolve_device("cuda")


def test_docstring_example_runs():
    import doctest

    import vlmoe.device

    result = doctest.testmod(vlmoe.device, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
