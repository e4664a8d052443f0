-- Deterministic rows (setseed) so tests can compare counts and values after a restore.
SELECT setseed(0.42);


INSERT INTO users (email, name, "isAdmin")
SELECT 'user' || i || '@example.org', 'User ' || i, i = 1 FROM generate_series(1, 5) i;

INSERT INTO assets ("ownerId", "deviceAssetId", type, "originalPath", "originalFileName", checksum,
                    "fileCreatedAt", "isFavorite", thumbhash)
SELECT u.id,
       'IMG_' || i || '.JPG-' || (i * 7919 % 100000),
       CASE WHEN i % 10 = 0 THEN 'VIDEO' ELSE 'IMAGE' END,
       '/data/library/' || u.id || '/' || (2010 + i % 15) || '/' || lpad((i % 12 + 1)::text, 2, '0') || '/IMG_' || i || '.jpg',
       'IMG_' || i || '.jpg',
       sha256(i::text::bytea),
       timestamptz '2010-01-01' + (i || ' minutes')::interval * 37,
       i % 17 = 0,
       decode(md5(i::text) || md5((i + 1)::text), 'hex')
FROM generate_series(1, 90000) i
JOIN (SELECT id, row_number() OVER (ORDER BY email) AS n FROM users) u ON u.n = 1 + i % 5;

INSERT INTO exif ("assetId", make, model, "exifImageWidth", "exifImageHeight", latitude, longitude, city, country, description)
SELECT id, 'Canon', 'EOS ' || (abs(hashtext(id::text)) % 90), 6000, 4000,
       -60 + random() * 120, -180 + random() * 360,
       'City ' || (abs(hashtext(id::text)) % 5000), 'Country ' || (abs(hashtext(id::text)) % 200),
       repeat(md5(id::text), 2)
FROM assets;

INSERT INTO albums ("ownerId", "albumName")
SELECT id, 'Album ' || g FROM users, generate_series(1, 20) g;

INSERT INTO albums_assets ("albumId", "assetId")
SELECT DISTINCT ON (a.id) al.id, a.id
FROM assets a JOIN albums al ON al."ownerId" = a."ownerId"
WHERE a."isFavorite";

INSERT INTO geodata_places (id, name, longitude, latitude, "countryCode")
SELECT i, 'Place ' || i, -180 + random() * 360, -60 + random() * 120, chr(65 + i % 26) || chr(65 + i / 26 % 26)
FROM generate_series(1, 40000) i;

ANALYZE;
