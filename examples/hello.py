"""A first script for sandboxd: its output streams back line by line as it is produced."""
import os
import platform
import time

print(f"hello from {platform.node()}: uid {os.getuid()}, pid {os.getpid()}", flush=True)
for i in range(3):
    print(f"tick {i}", flush=True)
    time.sleep(0.3)
print("done")
