"""The S3 layer: a Store that moves bytes, and nothing above it imports botocore or aiohttp.

options.py   StoreOptions: what a Store may know, built from the Settings by its opener
store.py     Store: objects, multipart, SSE, rate limits, what the watchdogs read
retry.py     the one retry wrapper (--jobs, requests in flight, backoff)
classify.py  transient or not, and the one-line StoreError of each failure
direct.py    the direct signed aiohttp path and the threaded GET fetcher
patches.py   process-wide botocore/aiohttp patches and the Body they apply to
checksums.py the --checksum headers, part sizes
writers.py   MultipartUpload, StreamWriter (given a sealer by the repository)
pacing.py, budget.py, watchdog.py: rate limits, the memory budget, the stall watchdog
"""
