import pytest
import torch

from vlmoe.interop.tensors import CheckpointTensors


@pytest.mark.parametrize("name", ["llava_mole.pt", "model.safetensors"])
def test_an_empty_weights_file_says_so(tmp_path, name):
    file = tmp_path / name
    file.write_bytes(b"")  # torch's error for it is an EOFError with no text: "()" in the message
    with pytest.raises(ValueError) as error:
        CheckpointTensors(file)
    assert str(error.value) == f"{file}: the file is empty (0 bytes); fetch it again"


def test_a_foreign_pytorch_file_names_the_error_type(tmp_path):
    file = tmp_path / "llava_mole.pt"
    file.write_bytes(b"hello")  # torch's error is KeyError(101), whose text alone is "101"
    with pytest.raises(ValueError) as error:
        CheckpointTensors(file)
    assert str(error.value) == f"{file}: not a readable PyTorch checkpoint (KeyError: 101); fetch it again"


def test_a_checkpoint_file_reads_its_wrapped_tensors(tmp_path):
    torch.save({"state_dict": {"a": torch.ones(2)}}, tmp_path / "x.pt")
    tensors = CheckpointTensors(tmp_path / "x.pt")
    assert tensors.take("a").tolist() == [1.0, 1.0] and tensors.unused() == []
