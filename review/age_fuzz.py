import os, random, subprocess, sys
sys.path.insert(0, "/work/wt/review-crypt")
from pathlib import Path
from immich_stream import age
ids = age.read_identity_file(Path("/tmp/rc/k1"))
r2 = age.Recipient.parse(subprocess.run(["age-keygen","-y","/tmp/rc/k2"],capture_output=True,text=True).stdout)
rng = random.Random(1)
C = age.CHUNK
sizes = [0,1,C-1,C,C+1,2*C,3*C-1,5*C,5*C+7]
fails = 0
for size in sizes:
  for trial in range(6):
    data = os.urandom(size)
    e = age.Encryptor([ids[0].recipient, r2])
    out = []
    i = 0
    while i < size:
        n = rng.choice([0,1,C-1,C,C+1,2*C,rng.randrange(1,3*C)])
        piece = data[i:i+n]; i += len(piece)
        fin = (i >= size) and rng.random() < 0.5
        out.append(e.push(piece, final=fin))
        if fin: break
    if rng.random()<0.3 and not e.done: out.append(e.push(b"", final=False))
    out.append(e.finish())
    blob = b"".join(out)
    assert len(blob) == age.sealed_size(size, 2), (size, len(blob), age.sealed_size(size,2))
    for k in ("/tmp/rc/k1","/tmp/rc/k2"):
        p = subprocess.run(["age","-d","-i",k], input=blob, capture_output=True)
        if p.returncode or p.stdout != data:
            fails += 1; print("FAIL", size, k, p.stderr[:200])
    # our decryptor with random feed splits
    d = age.Decryptor(ids); got=[]; j=0
    while j < len(blob):
        n = rng.randrange(1, 200000); got += d.feed(blob[j:j+n]); j += n
    got += d.finish()
    assert b"".join(got) == data
# age-written files opened by us
for size in sizes:
    data = os.urandom(size)
    blob = subprocess.run(["age","-r",str(ids[0].recipient),"-r",str(r2)], input=data, capture_output=True, check=True).stdout
    assert age.open_sealed(blob, ids) == data, size
print("fails", fails)
