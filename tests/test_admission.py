"""
Tests for L{lpxy.tunnelservice.admission}: the connection counts on plain
data, and the default total below the descriptor limit.
"""

from __future__ import annotations

import resource

from twisted.trial.unittest import SynchronousTestCase

from lpxy.tunnelservice.admission import (
    DESCRIPTOR_RESERVE,
    Admission,
    default_max_connections,
)


class AdmissionTests(SynchronousTestCase):
    """L{Admission} counting connections by address and in all."""

    def test_per_address(self) -> None:
        admission = Admission(max_connections=10, max_per_address=2)
        self.assertIsNone(admission.admit("a1", "10.0.0.1"))
        self.assertIsNone(admission.admit("a2", "10.0.0.1"))
        self.assertEqual(admission.admit("a3", "10.0.0.1"),
                         "2 connections open from 10.0.0.1")
        self.assertIsNone(admission.admit("b1", "10.0.0.2"))
        self.assertEqual((admission.count("10.0.0.1"), admission.total), (2, 3))

    def test_total(self) -> None:
        admission = Admission(max_connections=2, max_per_address=5)
        self.assertIsNone(admission.admit("a", "10.0.0.1"))
        self.assertIsNone(admission.admit("b", "10.0.0.2"))
        self.assertEqual(admission.admit("c", "10.0.0.3"), "2 connections open in all")
        self.assertEqual(admission.count("10.0.0.3"), 0)

    def test_release(self) -> None:
        admission = Admission(max_connections=2, max_per_address=1)
        admission.admit("a", "10.0.0.1")
        self.assertIsNotNone(admission.admit("b", "10.0.0.1"))
        admission.release("a")
        self.assertEqual((admission.count("10.0.0.1"), admission.total), (0, 0))
        self.assertIsNone(admission.admit("b", "10.0.0.1"))

    def test_release_unknown_or_twice(self) -> None:
        """Releasing a refused connection, or one already released, changes nothing."""
        admission = Admission(max_connections=5, max_per_address=5)
        admission.admit("a", "10.0.0.1")
        admission.admit("b", "10.0.0.1")
        admission.release("never")
        admission.release("a")
        admission.release("a")
        self.assertEqual((admission.count("10.0.0.1"), admission.total), (1, 1))

    def test_admit_twice_counts_once(self) -> None:
        admission = Admission(max_connections=5, max_per_address=5)
        admission.admit("a", "10.0.0.1")
        self.assertIsNone(admission.admit("a", "10.0.0.1"))
        self.assertEqual(admission.total, 1)


class DefaultTotalTests(SynchronousTestCase):
    """L{default_max_connections} keeps descriptors in reserve."""

    def test_below_descriptor_limit(self) -> None:
        self.assertEqual(default_max_connections(1024), 1024 - DESCRIPTOR_RESERVE)

    def test_at_least_one(self) -> None:
        self.assertEqual(default_max_connections(10), 1)

    def test_unlimited(self) -> None:
        self.assertEqual(default_max_connections(resource.RLIM_INFINITY), 65536)

    def test_process_limit(self) -> None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.assertEqual(default_max_connections(), default_max_connections(soft))
