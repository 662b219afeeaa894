"""Tools that build and check the project on other machines (not shipped with the package)."""
