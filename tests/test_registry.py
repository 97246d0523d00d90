"""The one registry helper behind models.utils.register_model and sampling.register_*."""
import pytest

import sampling
from models import utils as mutils
from registry import Registry


def test_register_bare_and_named_then_get():
    kinds = Registry("widget")

    @kinds.register
    class Plain:
        pass

    @kinds.register(name="fancy")
    class Named:
        pass

    assert kinds.get("Plain") is Plain and kinds.get("fancy") is Named
    assert "fancy" in kinds and "Named" not in kinds
    assert kinds.names() == ["Plain", "fancy"]
    assert kinds.register(Plain) is Plain  # registering the same class again is harmless
    with pytest.raises(ValueError) as error:
        kinds.register(type("Plain", (), {}))
    assert str(error.value) == "A widget named 'Plain' is already registered."
    with pytest.raises(ValueError) as error:
        kinds.get("gizmo")
    assert str(error.value) == "Unknown widget 'gizmo': choose one of Plain, fancy."


def test_project_registries_keep_their_names_and_messages():
    assert sampling._CORRECTORS.names() == ["ald", "langevin", "none"]
    assert sampling._PREDICTORS.names() == [
        "ancestral_sampling", "euler_maruyama", "none", "reverse_diffusion"]
    with pytest.raises(ValueError) as error:
        sampling.get_corrector("hmc")
    assert str(error.value) == "Unknown corrector 'hmc': choose one of ald, langevin, none."
    mutils._import_networks()  # registers every network (get_model does only for unknown names)
    assert {"ncsnpp", "ddpm", "ncsn", "ncsnv2_64", "ncsnv2_128", "ncsnv2_256"} <= set(
        mutils._MODELS.names())
    with pytest.raises(ValueError, match="already registered"):
        mutils.register_model(type("Other", (), {}), name="ncsnpp")
