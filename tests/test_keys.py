"""controller.keys: new keys' prefixes, through `tokenpool keys new` as a user runs it."""

import subprocess
import sys

from controller import keys

RANDOM = 43  # characters of secrets.token_urlsafe(32)


def test_a_prefix_ending_in_a_separator_is_not_doubled():
    for prefix, head in (("tp-", "tp-"), ("svc_", "svc_"), ("tp", "tp-")):
        k = keys.new_key(prefix)
        assert k.startswith(head) and len(k) == len(head) + RANDOM, (prefix, k)
    out = subprocess.run([sys.executable, "-m", "controller.keys", "new", "--prefix", "team-a-"], capture_output=True,
                         text=True, check=True).stdout
    key = out.split()[1]
    assert key.startswith("team-a-") and len(key) == len("team-a-") + RANDOM
