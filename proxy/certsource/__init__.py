"""Where the sidecar's certificate comes from: files on disk (watched) or the internal CA.

`proxy.certsource.ca.CaSource` enrols with the `ca serve` service and renews over mTLS.
Submodules are imported explicitly so that the files source does not pull in aiohttp.
"""
