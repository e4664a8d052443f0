-- Rows as a small real Immich holds them: users, an external library, photos and videos with
-- exif (camera, GPS, place), their thumbnail and preview files, CLIP embeddings, faces with
-- their embeddings and people, albums, reverse-geocoding places; then deletions that fire
-- the audit triggers and updates that fire the updatedAt triggers.
-- Deterministic (setseed) apart from timestamps and ids: tests compare before and after.
SELECT setseed(0.25);

INSERT INTO "user" (email, name, "isAdmin", "storageLabel", "quotaUsageInBytes", "avatarColor")
SELECT 'user' || i || '@example.org', 'User ' || i, i = 1, CASE WHEN i = 1 THEN 'admin' END, i * 1000000,
       (ARRAY['primary', 'pink', 'red', 'yellow'])[i]
FROM generate_series(1, 4) i;

INSERT INTO library (name, "ownerId", "importPaths", "exclusionPatterns", "refreshedAt")
SELECT 'NAS photos', id, ARRAY['/mnt/nas/photos', '/mnt/nas/scans'], ARRAY['**/@eaDir/**', '**/.*/**'], now()
FROM "user" WHERE email = 'user1@example.org';

-- 900 uploads (under /data/library/<user>/...) and 300 assets of the external library
INSERT INTO asset ("deviceAssetId", "ownerId", "deviceId", type, "originalPath", "fileCreatedAt", "fileModifiedAt",
                   "isFavorite", duration, "encodedVideoPath", checksum, "originalFileName", thumbhash,
                   "libraryId", "isExternal", "localDateTime", visibility)
SELECT 'IMG_' || i || '.JPG-' || (i * 7919 % 100000),
       u.id,
       CASE WHEN i > 900 THEN 'Library Import' ELSE 'phone-' || u.n END,
       CASE WHEN i % 10 = 0 THEN 'VIDEO' ELSE 'IMAGE' END,
       CASE WHEN i > 900 THEN '/mnt/nas/photos/' || (2010 + i % 15) || '/DSC_' || i || '.jpg'
            ELSE '/data/library/' || u.id || '/' || (2010 + i % 15) || '/' || lpad((i % 12 + 1)::text, 2, '0')
                 || '/IMG_' || i || CASE WHEN i % 10 = 0 THEN '.mp4' ELSE '.jpg' END END,
       timestamptz '2010-01-01 12:00+00' + i * interval '37 hours',
       timestamptz '2010-01-01 12:00+00' + i * interval '37 hours' + interval '5 seconds',
       i % 17 = 0,
       CASE WHEN i % 10 = 0 THEN '0:00:' || lpad((i % 60)::text, 2, '0') || '.000000' END,
       CASE WHEN i % 10 = 0 THEN '/data/encoded-video/' || u.id || '/' || i || '.mp4' ELSE '' END,
       substring(sha256(i::text::bytea) FROM 1 FOR 20),  -- 20 bytes, as a SHA-1
       CASE WHEN i > 900 THEN 'DSC_' || i || '.jpg' ELSE 'IMG_' || i || CASE WHEN i % 10 = 0 THEN '.mp4' ELSE '.jpg' END END,
       decode(md5(i::text) || substr(md5((i + 1)::text), 1, 10), 'hex'),
       CASE WHEN i > 900 THEN (SELECT id FROM library) END,
       i > 900,
       timestamp '2010-01-01 14:00' + i * interval '37 hours',
       (CASE WHEN i % 50 = 0 THEN 'archive' WHEN i % 97 = 0 THEN 'locked' ELSE 'timeline' END)::asset_visibility_enum
FROM generate_series(1, 1200) i
JOIN (SELECT id, row_number() OVER (ORDER BY email) AS n FROM "user") u
  ON u.n = CASE WHEN i > 900 THEN 1 ELSE 1 + i % 4 END;

-- Immich's place names, world-wide, with the names of their regions
INSERT INTO geodata_places (id, name, longitude, latitude, "countryCode", "admin1Code", "admin2Code",
                            "modificationDate", "admin1Name", "admin2Name", "alternateNames")
SELECT 2000000 + i, 'Ville ' || i || CASE WHEN i % 7 = 0 THEN ' Saint-Étienne' ELSE '' END,
       round((-180 + random() * 360)::numeric, 5)::float8, round((-60 + random() * 130)::numeric, 5)::float8,
       chr(65 + i % 26) || chr(65 + i / 26 % 26), (i % 40)::text, (i % 300)::text, date '2024-06-01',
       'Region ' || i % 40, 'District ' || i % 300, 'Alt ' || i
FROM generate_series(1, 5000) i;

-- exif: the camera and its settings, GPS for nine in ten, the place it resolves to
INSERT INTO asset_exif ("assetId", make, model, "exifImageWidth", "exifImageHeight", "fileSizeInByte", orientation,
                        "dateTimeOriginal", "lensModel", "fNumber", "focalLength", iso, latitude, longitude,
                        "exposureTime", "timeZone", "projectionType", "profileDescription", colorspace,
                        "bitsPerSample", rating, description)
SELECT a.id, m.make, m.model, 4032, 3024, 2000000 + abs(hashtext(a.id::text)) % 6000000, '1',
       a."fileCreatedAt", m.make || ' lens', 1.8, 4.2, 50 * (1 + abs(hashtext(a."originalPath")) % 64),
       CASE WHEN n % 10 <> 0 THEN round((-55 + random() * 120)::numeric, 6)::float8 END,
       CASE WHEN n % 10 <> 0 THEN round((-175 + random() * 350)::numeric, 6)::float8 END,
       '1/' || (60 * (1 + n % 8)), 'Europe/Berlin', NULL, 'sRGB IEC61966-2.1', 'RGB', 8,
       CASE WHEN n % 13 = 0 THEN n % 6 END,
       CASE WHEN n % 11 = 0 THEN 'Été à la mer, n°' || n || E'\ttab and \\ backslash' ELSE '' END
FROM (SELECT a.*, row_number() OVER (ORDER BY "originalPath") AS n FROM asset a) a
JOIN (VALUES (0, 'Apple', 'iPhone 15 Pro'), (1, 'Google', 'Pixel 8'), (2, 'SONY', 'ILCE-7M4')) m(k, make, model)
  ON m.k = a.n % 3;

-- reverse geocoding: the nearest place within the box, as Immich's job does it
UPDATE asset_exif e SET (city, state, country) = (
    SELECT name, "admin1Name", 'Country ' || "countryCode" FROM geodata_places g
    WHERE earth_box(ll_to_earth_public(e.latitude, e.longitude), 500000) @> ll_to_earth_public(g.latitude, g.longitude)
    ORDER BY earth_distance(ll_to_earth_public(e.latitude, e.longitude), ll_to_earth_public(g.latitude, g.longitude))
    LIMIT 1)
WHERE e.latitude IS NOT NULL;

INSERT INTO asset_file ("assetId", type, path)
SELECT a.id, t.type, '/data/thumbs/' || a."ownerId" || '/' || substr(a.id::text, 1, 2) || '/' || substr(a.id::text, 3, 2)
                     || '/' || a.id || '-' || t.type || CASE t.type WHEN 'preview' THEN '.jpeg' ELSE '.webp' END
FROM asset a CROSS JOIN (VALUES ('preview'), ('thumbnail')) t(type);

-- a burst of three shots stacked on its first
INSERT INTO stack ("primaryAssetId", "ownerId")
SELECT id, "ownerId" FROM asset WHERE "originalFileName" IN ('IMG_100.mp4', 'IMG_200.mp4');
UPDATE asset a SET "stackId" = s.id FROM stack s
WHERE a."ownerId" = s."ownerId" AND a."originalFileName" IN ('IMG_100.mp4', 'IMG_104.jpg', 'IMG_108.jpg', 'IMG_200.mp4', 'IMG_204.jpg')
  AND (a."originalFileName" < 'IMG_2') = (s."primaryAssetId" IN (SELECT id FROM asset WHERE "originalFileName" = 'IMG_100.mp4'));

INSERT INTO asset_job_status ("assetId", "facesRecognizedAt", "metadataExtractedAt", "duplicatesDetectedAt", "previewAt", "thumbnailAt")
SELECT id, now(), now(), now(), now(), now() FROM asset;

-- CLIP embeddings: unit-length, 512 dimensions, ten clusters (so nearest neighbours are meaningful)
CREATE TEMP TABLE centre AS
SELECT c, array_agg(random() - 0.5 ORDER BY d) AS v FROM generate_series(0, 9) c, generate_series(1, 512) d GROUP BY c;

CREATE TEMP TABLE clip AS
SELECT a.id, (SELECT array_agg((x.v + (random() - 0.5) * 0.3)::real ORDER BY x.d)
              FROM unnest(ce.v) WITH ORDINALITY x(v, d) WHERE a.id IS NOT NULL) AS v
FROM (SELECT id, row_number() OVER (ORDER BY "originalPath") AS n FROM asset) a
JOIN centre ce ON ce.c = a.n % 10;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector') THEN
        EXECUTE 'INSERT INTO smart_search ("assetId", embedding) SELECT id, v::vector FROM clip';
    ELSE
        INSERT INTO smart_search ("assetId", embedding) SELECT id, v FROM clip;
    END IF;
END $$;

-- people and faces: 12 people, one or two faces on one photo in three
INSERT INTO person ("ownerId", name, "birthDate", "isFavorite", color, "thumbnailPath")
SELECT u.id, CASE WHEN p % 4 = 0 THEN '' ELSE 'Person ' || p END,
       CASE WHEN p % 3 = 0 THEN date '1980-01-01' + p * 400 END, p = 1, NULL,
       '/data/thumbs/' || u.id || '/pe/' || p || '.jpeg'
FROM generate_series(1, 12) p JOIN (SELECT id, row_number() OVER (ORDER BY email) AS n FROM "user") u ON u.n = 1 + p % 4;

INSERT INTO asset_face ("assetId", "personId", "imageWidth", "imageHeight", "boundingBoxX1", "boundingBoxY1",
                        "boundingBoxX2", "boundingBoxY2", "sourceType")
SELECT a.id, (SELECT id FROM person pe WHERE pe."ownerId" = a."ownerId" ORDER BY "thumbnailPath" OFFSET (a.n + f) % 3 LIMIT 1),
       4032, 3024, 100 * f, 200, 100 * f + 300, 600,
       (CASE WHEN a.n % 29 = 0 THEN 'manual' ELSE 'machine-learning' END)::sourcetype
FROM (SELECT id, "ownerId", row_number() OVER (ORDER BY "originalPath") AS n FROM asset) a
CROSS JOIN generate_series(1, 2) f
WHERE a.n % 3 = 0 AND (f = 1 OR a.n % 2 = 0);

CREATE TEMP TABLE face AS
SELECT f.id, (SELECT array_agg((random() - 0.5)::real) FROM generate_series(1, 512) WHERE f.id IS NOT NULL) AS v
FROM asset_face f;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector') THEN
        EXECUTE 'INSERT INTO face_search ("faceId", embedding) SELECT id, v::vector FROM face';
    ELSE
        INSERT INTO face_search ("faceId", embedding) SELECT id, v FROM face;
    END IF;
END $$;

UPDATE person p SET "faceAssetId" = (SELECT id FROM asset_face f WHERE f."personId" = p.id ORDER BY "assetId" LIMIT 1);

-- albums: five per user, each with the user's favourites and every seventh photo; one shared
INSERT INTO album ("ownerId", "albumName", description, "order")
SELECT u.id, 'Album ' || g || ' of ' || u.name, CASE WHEN g = 1 THEN 'Vacances d''été' ELSE '' END,
       CASE WHEN g % 2 = 0 THEN 'asc' ELSE 'desc' END
FROM "user" u, generate_series(1, 5) g;

INSERT INTO album_asset ("albumsId", "assetsId")
SELECT DISTINCT ON (a.id) al.id, a.id
FROM (SELECT *, row_number() OVER (ORDER BY "originalPath") AS n FROM asset) a
JOIN album al ON al."ownerId" = a."ownerId"
WHERE a."isFavorite" OR a.n % 7 = 0
ORDER BY a.id, al."albumName";

UPDATE album al SET "albumThumbnailAssetId" = (SELECT "assetsId" FROM album_asset aa WHERE aa."albumsId" = al.id ORDER BY "assetsId" LIMIT 1);

INSERT INTO album_user ("albumsId", "usersId", role)
SELECT al.id, u.id, 'viewer'
FROM album al JOIN "user" o ON o.id = al."ownerId" AND o.email = 'user1@example.org'
JOIN "user" u ON u.email = 'user2@example.org'
WHERE al."albumName" LIKE 'Album 1 %';

INSERT INTO system_metadata (key, value) VALUES
    ('reverse-geocoding-state', '{"lastUpdate": "2024-06-01T00:00:00.000Z", "lastImportFileName": "cities500.txt"}'),
    ('system-flags', '{"mountChecks": {"thumbs": true, "upload": true, "backups": true, "library": true, "profile": true, "encoded-video": true}}'),
    ('version-check-state', '{"checkedAt": "2025-11-20T03:00:00.000Z", "releaseVersion": "v2.3.1"}');
INSERT INTO version_history (version, "createdAt") VALUES ('v1.132.3', '2025-04-22'), ('v2.3.1', '2025-11-20');

-- triggers firing: a user deleted with their assets (asset_audit through the cascade is not
-- recorded, by Immich's pg_trigger_depth() = 0 rule), an asset and an album deleted, updates
DELETE FROM asset WHERE "originalFileName" = 'IMG_899.jpg';
DELETE FROM album WHERE "albumName" = 'Album 5 of User 3';
INSERT INTO "user" (email, name) VALUES ('leaver@example.org', 'Leaver');
DELETE FROM "user" WHERE email = 'leaver@example.org';
UPDATE asset SET "isFavorite" = true WHERE "originalFileName" IN ('IMG_3.jpg', 'IMG_4.jpg');
UPDATE asset_exif SET rating = 5 WHERE "assetId" IN (SELECT id FROM asset WHERE "originalFileName" = 'IMG_5.jpg');

ANALYZE;
