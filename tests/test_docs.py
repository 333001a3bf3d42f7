"""The README's generated lists (`python -m jax_sft.docs`) match the code."""

from jax_sft import docs
from jax_sft.models import registry


def test_readme_generated_blocks_are_current():
    text = docs.README.read_text()
    assert docs.render(text) == text, "run: python -m jax_sft.docs"


def test_every_registered_architecture_is_in_the_readme():
    text = docs.README.read_text()
    for family in registry.FAMILIES.values():
        for architecture in family.architectures:
            assert f"`{architecture}`" in text
