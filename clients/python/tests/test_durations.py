"""parse_go_duration and parse_rfc3339 against the forms Go's time.Duration.String() and RFC 3339 produce."""

import os
import sys
import unittest
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nydus_client import parse_go_duration, parse_rfc3339  # noqa: E402


class GoDurationTest(unittest.TestCase):
    def test_every_unit_and_compound(self):
        cases = {
            "0s": 0.0,
            "0": 0.0,
            "250ns": 250e-9,
            "1.5us": 1.5e-6,
            "512.3\u00b5s": 0.0005123,  # micro sign, what Go prints
            "512.3\u03bcs": 0.0005123,  # greek mu, what Go also accepts
            "8.72416ms": 0.00872416,
            "22.802283ms": 0.022802283,
            "1.5s": 1.5,
            "58.7s": 58.7,
            "2m3.5s": 123.5,
            "1h0m0s": 3600.0,
            "1h2m3.004005006s": 3723.004005006,
            ".5s": 0.5,
            "1.s": 1.0,
            "-1.5h": -5400.0,
            "+3m": 180.0,
        }
        for text, seconds in cases.items():
            with self.subTest(text=text):
                self.assertAlmostEqual(parse_go_duration(text), seconds, places=12)

    def test_exact_decimal_values(self):
        self.assertEqual(parse_go_duration("512.3\u00b5s"), 0.0005123)
        self.assertEqual(parse_go_duration("25.3ms"), 0.0253)

    def test_rejects_what_go_rejects(self):
        for text in ["", "s", "1", "1.5", "-", "1x", "1m s", " 1s", "1s ", "1S", "1 ms", "1.2.3s", "ms"]:
            with self.subTest(text=text):
                with self.assertRaises(ValueError):
                    parse_go_duration(text)

    def test_rejects_non_strings(self):
        with self.assertRaises(ValueError):
            parse_go_duration(1.5)


class Rfc3339Test(unittest.TestCase):
    def test_utc_offset_and_fractions(self):
        self.assertEqual(
            parse_rfc3339("2025-07-18T16:51:52Z"),
            datetime(2025, 7, 18, 16, 51, 52, tzinfo=timezone.utc),
        )
        self.assertEqual(
            parse_rfc3339("2025-07-18T16:51:52.123456789Z"),
            datetime(2025, 7, 18, 16, 51, 52, 123456, tzinfo=timezone.utc),
        )
        self.assertEqual(
            parse_rfc3339("2025-07-18t16:51:52.5+02:00"),
            datetime(2025, 7, 18, 16, 51, 52, 500000, tzinfo=timezone(timedelta(hours=2))),
        )

    def test_rejects_times_without_offset_and_garbage(self):
        for text in ["2025-07-18T16:51:52", "2025-07-18", "yesterday", "2025-07-18T16:51:52Zjunk"]:
            with self.subTest(text=text):
                with self.assertRaises(ValueError):
                    parse_rfc3339(text)


if __name__ == "__main__":
    unittest.main()
