from setuptools import setup

# Everything declarative lives in pyproject.toml; setup.py only wires in the cffi extension build.
setup(cffi_modules=["pyqrt/_build.py:ffibuilder"])
