"""Helpers for the end-to-end tests: cluster providers and small Kubernetes utilities.

Imported as ``harness`` (pytest puts ``e2e/`` on ``sys.path``; ``e2e/`` itself is not a
package, so nothing named ``e2e`` shadows anything).
"""
