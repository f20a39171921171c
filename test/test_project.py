"""Project layout rules that other code and the docs rely on."""

from pathlib import Path

import transformers

import model

ROOT = Path(__file__).resolve().parents[1]


def test_every_model_component_has_its_test_file():
    components = [p.stem for p in (ROOT / "model").glob("*.py") if p.stem != "__init__"]
    missing = [name for name in components if not (ROOT / "test" / f"test_{name}.py").exists()]
    # modeling.py is the assembled model; its tests live in test_modeling.py like every other component's.
    assert components and not missing, f"components without test/test_<name>.py: {missing}"


def test_every_utils_module_has_its_test_file():
    # utils/config.py's tests are test_utils_config.py (test_config.py is model/config.py's); utils/data.py has one
    # file per component of it (test_data_records.py, test_data_sft.py, ...).
    modules = [p.stem for p in (ROOT / "utils").glob("*.py") if p.stem != "__init__"]
    tests = {p.stem for p in (ROOT / "test").glob("test_*.py")}
    missing = [name for name in modules if not ({f"test_{name}", f"test_utils_{name}"} & tests
                                                 or any(test.startswith(f"test_{name}_") for test in tests))]
    assert modules and not missing, f"utils modules without test/test_<name>.py: {missing}"


def test_datasets_folder_holds_data_only():
    # No Python files (above all no __init__.py): where the Hugging Face `datasets` library is installed it wins.
    datasets = ROOT / "datasets"
    python_files = list(datasets.rglob("*.py")) if datasets.exists() else []
    assert not python_files, f"datasets/ must hold data only, found {python_files}"


def test_public_names_and_auto_registration():
    for name in model.__all__:
        assert hasattr(model, name), name
    config = transformers.AutoConfig.for_model("stellarbyte", vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2)
    assert isinstance(config, model.ByteModelConfig)
    assert type(transformers.AutoModelForCausalLM.from_config(config)) is model.ByteModel
    assert type(transformers.AutoModel.from_config(config)) is model.ByteBaseModel
