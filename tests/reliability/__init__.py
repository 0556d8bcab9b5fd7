"""The reliability suite: faults, hygiene, security, fuzz, soak and one test per fixed defect (a
package, so that its conftest does not shadow tests/conftest.py)."""
