-- Immich's real schema, in the naming of Immich v1.137 and later (after the StandardizeNames
-- migration of July 2025: asset, asset_exif, album, "user", library, ...), with absolute paths
-- (ConvertToAbsolutePaths) and the asset visibility enum. Written here from what Immich's
-- migrations (server/src/schema/migrations) create: the same extensions, functions, enums,
-- tables, column names and types, keys, triggers and indexes; not a copy of their SQL, and only
-- the tables a backup's restore is judged on (Immich has ~60; the rest are alike in kind).
-- 25-legacy-names.sql turns it into the names of Immich before v1.137 (assets, exif, albums,
-- albums_assets_assets, users, libraries, ...).
--
-- Vector extension: pgvector (`vector`) where the image has it, as in Immich's default images.
-- Stand-in, documented: on an image without any vector extension (our PostgreSQL 15 from
-- bookworm, which has no pgvector package), the two embedding columns are real[] and there is
-- no HNSW index; every other object is the same.

CREATE EXTENSION IF NOT EXISTS "uuid-ossp";
CREATE EXTENSION IF NOT EXISTS unaccent;
CREATE EXTENSION IF NOT EXISTS cube;
CREATE EXTENSION IF NOT EXISTS earthdistance;
CREATE EXTENSION IF NOT EXISTS pg_trgm;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector') THEN
        CREATE EXTENSION IF NOT EXISTS vector CASCADE;
    END IF;
END $$;

-- A time-ordered uuid (version 7 layout) from a random one: the update ids of every table.
CREATE FUNCTION immich_uuid_v7(p_timestamp timestamptz DEFAULT clock_timestamp()) RETURNS uuid
VOLATILE LANGUAGE sql AS $$
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send((extract(epoch FROM p_timestamp) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$$;

CREATE FUNCTION updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    now_ts timestamp := clock_timestamp();
BEGIN
    NEW."updatedAt" := now_ts;
    NEW."updateId" := immich_uuid_v7(now_ts);
    RETURN NEW;
END $$;

CREATE FUNCTION f_concat_ws(text, text[]) RETURNS text
PARALLEL SAFE IMMUTABLE LANGUAGE sql AS $$SELECT array_to_string($2, $1)$$;

CREATE FUNCTION f_unaccent(text) RETURNS text
PARALLEL SAFE STRICT IMMUTABLE LANGUAGE sql RETURN unaccent('unaccent', $1);

-- earthdistance's ll_to_earth with every name schema-qualified, so that the GiST index on it
-- survives a restore whose search_path is empty (pg_dump's).
CREATE FUNCTION ll_to_earth_public(latitude double precision, longitude double precision) RETURNS public.earth
PARALLEL SAFE STRICT IMMUTABLE LANGUAGE sql AS $$
    SELECT public.cube(public.cube(public.cube(
        public.earth() * cos(radians(latitude)) * cos(radians(longitude))),
        public.earth() * cos(radians(latitude)) * sin(radians(longitude))),
        public.earth() * sin(radians(latitude)))::public.earth
$$;

CREATE TYPE assets_status_enum AS ENUM ('active', 'trashed', 'deleted');
CREATE TYPE sourcetype AS ENUM ('machine-learning', 'exif', 'manual');
CREATE TYPE asset_visibility_enum AS ENUM ('archive', 'timeline', 'hidden', 'locked');

CREATE TABLE "user" (
    id uuid NOT NULL DEFAULT uuid_generate_v4(),
    email varchar NOT NULL,
    password varchar NOT NULL DEFAULT '',
    "createdAt" timestamptz NOT NULL DEFAULT now(),
    "profileImagePath" varchar NOT NULL DEFAULT '',
    "isAdmin" boolean NOT NULL DEFAULT false,
    "shouldChangePassword" boolean NOT NULL DEFAULT true,
    "deletedAt" timestamptz,
    "oauthId" varchar NOT NULL DEFAULT '',
    "updatedAt" timestamptz NOT NULL DEFAULT now(),
    "storageLabel" varchar,
    name varchar NOT NULL DEFAULT '',
    "quotaSizeInBytes" bigint,
    "quotaUsageInBytes" bigint NOT NULL DEFAULT 0,
    status varchar NOT NULL DEFAULT 'active',
    "profileChangedAt" timestamptz NOT NULL DEFAULT now(),
    "updateId" uuid NOT NULL DEFAULT immich_uuid_v7(),
    "avatarColor" varchar,
    "pinCode" varchar,
    CONSTRAINT user_pkey PRIMARY KEY (id),
    CONSTRAINT user_email_uq UNIQUE (email),
    CONSTRAINT "user_storageLabel_uq" UNIQUE ("storageLabel")
);

CREATE TABLE library (
    id uuid NOT NULL DEFAULT uuid_generate_v4(),
    name varchar NOT NULL,
    "ownerId" uuid NOT NULL,
    "importPaths" text[] NOT NULL,
    "exclusionPatterns" text[] NOT NULL,
    "createdAt" timestamptz NOT NULL DEFAULT now(),
    "updatedAt" timestamptz NOT NULL DEFAULT now(),
    "deletedAt" timestamptz,
    "refreshedAt" timestamptz,
    "updateId" uuid NOT NULL DEFAULT immich_uuid_v7(),
    CONSTRAINT library_pkey PRIMARY KEY (id),
    CONSTRAINT "library_ownerId_fkey" FOREIGN KEY ("ownerId") REFERENCES "user" (id) ON UPDATE CASCADE ON DELETE CASCADE
);

CREATE TABLE stack (
    id uuid NOT NULL DEFAULT uuid_generate_v4(),
    "primaryAssetId" uuid NOT NULL,
    "ownerId" uuid NOT NULL,
    "createdAt" timestamptz NOT NULL DEFAULT now(),
    "updatedAt" timestamptz NOT NULL DEFAULT now(),
    "updateId" uuid NOT NULL DEFAULT immich_uuid_v7(),
    CONSTRAINT stack_pkey PRIMARY KEY (id),
    CONSTRAINT "stack_primaryAssetId_uq" UNIQUE ("primaryAssetId"),
    CONSTRAINT "stack_ownerId_fkey" FOREIGN KEY ("ownerId") REFERENCES "user" (id) ON UPDATE CASCADE ON DELETE CASCADE
);

CREATE TABLE asset (
    id uuid NOT NULL DEFAULT uuid_generate_v4(),
    "deviceAssetId" varchar NOT NULL,
    "ownerId" uuid NOT NULL,
    "deviceId" varchar NOT NULL,
    type varchar NOT NULL,
    "originalPath" varchar NOT NULL,
    "fileCreatedAt" timestamptz NOT NULL,
    "fileModifiedAt" timestamptz NOT NULL,
    "isFavorite" boolean NOT NULL DEFAULT false,
    duration varchar,
    "encodedVideoPath" varchar DEFAULT '',
    checksum bytea NOT NULL,
    "livePhotoVideoId" uuid,
    "updatedAt" timestamptz NOT NULL DEFAULT now(),
    "createdAt" timestamptz NOT NULL DEFAULT now(),
    "originalFileName" varchar NOT NULL,
    "sidecarPath" varchar,
    thumbhash bytea,
    "isOffline" boolean NOT NULL DEFAULT false,
    "libraryId" uuid,
    "isExternal" boolean NOT NULL DEFAULT false,
    "deletedAt" timestamptz,
    "localDateTime" timestamptz NOT NULL,
    "stackId" uuid,
    "duplicateId" uuid,
    status assets_status_enum NOT NULL DEFAULT 'active',
    "updateId" uuid NOT NULL DEFAULT immich_uuid_v7(),
    visibility asset_visibility_enum NOT NULL DEFAULT 'timeline',
    CONSTRAINT asset_pkey PRIMARY KEY (id),
    CONSTRAINT "asset_ownerId_fkey" FOREIGN KEY ("ownerId") REFERENCES "user" (id) ON UPDATE CASCADE ON DELETE CASCADE,
    CONSTRAINT "asset_livePhotoVideoId_fkey" FOREIGN KEY ("livePhotoVideoId") REFERENCES asset (id) ON UPDATE CASCADE ON DELETE SET NULL,
    CONSTRAINT "asset_libraryId_fkey" FOREIGN KEY ("libraryId") REFERENCES library (id) ON UPDATE CASCADE ON DELETE CASCADE,
    CONSTRAINT "asset_stackId_fkey" FOREIGN KEY ("stackId") REFERENCES stack (id) ON UPDATE CASCADE ON DELETE SET NULL
);
ALTER TABLE stack ADD CONSTRAINT "stack_primaryAssetId_fkey" FOREIGN KEY ("primaryAssetId") REFERENCES asset (id);
CREATE INDEX "asset_ownerId_idx" ON asset ("ownerId");
CREATE INDEX asset_checksum_idx ON asset (checksum);
CREATE UNIQUE INDEX "UQ_assets_owner_checksum" ON asset ("ownerId", checksum) WHERE ("libraryId" IS NULL);
CREATE UNIQUE INDEX "UQ_assets_owner_library_checksum" ON asset ("ownerId", "libraryId", checksum) WHERE ("libraryId" IS NOT NULL);
CREATE INDEX "asset_originalFilename_trigram_idx" ON asset USING gin (f_unaccent("originalFileName") gin_trgm_ops);
CREATE INDEX "asset_localDateTime_idx" ON asset ((("localDateTime" AT TIME ZONE 'UTC')::date));

CREATE TABLE asset_exif (
    "assetId" uuid NOT NULL,
    make varchar,
    model varchar,
    "exifImageWidth" integer,
    "exifImageHeight" integer,
    "fileSizeInByte" bigint,
    orientation varchar,
    "dateTimeOriginal" timestamptz,
    "modifyDate" timestamptz,
    "lensModel" varchar,
    "fNumber" double precision,
    "focalLength" double precision,
    iso integer,
    latitude double precision,
    longitude double precision,
    city varchar,
    state varchar,
    country varchar,
    description text NOT NULL DEFAULT '',
    fps double precision,
    "exposureTime" varchar,
    "livePhotoCID" varchar,
    "timeZone" varchar,
    "projectionType" varchar,
    "profileDescription" varchar,
    colorspace varchar,
    "bitsPerSample" integer,
    "autoStackId" varchar,
    rating integer,
    "updatedAt" timestamptz NOT NULL DEFAULT clock_timestamp(),
    "updateId" uuid NOT NULL DEFAULT immich_uuid_v7(),
    CONSTRAINT asset_exif_pkey PRIMARY KEY ("assetId"),
    CONSTRAINT "asset_exif_assetId_fkey" FOREIGN KEY ("assetId") REFERENCES asset (id) ON DELETE CASCADE
);
CREATE INDEX asset_exif_city_idx ON asset_exif (city);
CREATE INDEX "asset_exif_livePhotoCID_idx" ON asset_exif ("livePhotoCID");

CREATE TABLE asset_file (
    id uuid NOT NULL DEFAULT uuid_generate_v4(),
    "assetId" uuid NOT NULL,
    "createdAt" timestamptz NOT NULL DEFAULT now(),
    "updatedAt" timestamptz NOT NULL DEFAULT now(),
    type varchar NOT NULL,
    path varchar NOT NULL,
    "updateId" uuid NOT NULL DEFAULT immich_uuid_v7(),
    CONSTRAINT asset_file_pkey PRIMARY KEY (id),
    CONSTRAINT "asset_file_assetId_type_uq" UNIQUE ("assetId", type),
    CONSTRAINT "asset_file_assetId_fkey" FOREIGN KEY ("assetId") REFERENCES asset (id) ON UPDATE CASCADE ON DELETE CASCADE
);

CREATE TABLE asset_job_status (
    "assetId" uuid NOT NULL,
    "facesRecognizedAt" timestamptz,
    "metadataExtractedAt" timestamptz,
    "duplicatesDetectedAt" timestamptz,
    "previewAt" timestamptz,
    "thumbnailAt" timestamptz,
    CONSTRAINT asset_job_status_pkey PRIMARY KEY ("assetId"),
    CONSTRAINT "asset_job_status_assetId_fkey" FOREIGN KEY ("assetId") REFERENCES asset (id) ON UPDATE CASCADE ON DELETE CASCADE
);

CREATE TABLE album (
    id uuid NOT NULL DEFAULT uuid_generate_v4(),
    "ownerId" uuid NOT NULL,
    "albumName" varchar NOT NULL DEFAULT 'Untitled Album',
    "createdAt" timestamptz NOT NULL DEFAULT now(),
    "albumThumbnailAssetId" uuid,
    "updatedAt" timestamptz NOT NULL DEFAULT now(),
    description text NOT NULL DEFAULT '',
    "deletedAt" timestamptz,
    "isActivityEnabled" boolean NOT NULL DEFAULT true,
    "order" varchar NOT NULL DEFAULT 'desc',
    "updateId" uuid NOT NULL DEFAULT immich_uuid_v7(),
    CONSTRAINT album_pkey PRIMARY KEY (id),
    CONSTRAINT "album_ownerId_fkey" FOREIGN KEY ("ownerId") REFERENCES "user" (id) ON UPDATE CASCADE ON DELETE CASCADE,
    CONSTRAINT "album_albumThumbnailAssetId_fkey" FOREIGN KEY ("albumThumbnailAssetId") REFERENCES asset (id) ON UPDATE CASCADE ON DELETE SET NULL
);
COMMENT ON COLUMN album."albumThumbnailAssetId" IS 'Asset ID to be used as thumbnail';

CREATE TABLE album_asset (
    "albumsId" uuid NOT NULL,
    "assetsId" uuid NOT NULL,
    "createdAt" timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT album_asset_pkey PRIMARY KEY ("albumsId", "assetsId"),
    CONSTRAINT "album_asset_albumsId_fkey" FOREIGN KEY ("albumsId") REFERENCES album (id) ON UPDATE CASCADE ON DELETE CASCADE,
    CONSTRAINT "album_asset_assetsId_fkey" FOREIGN KEY ("assetsId") REFERENCES asset (id) ON UPDATE CASCADE ON DELETE CASCADE
);

CREATE TABLE album_user (
    "albumsId" uuid NOT NULL,
    "usersId" uuid NOT NULL,
    role varchar NOT NULL DEFAULT 'editor',
    CONSTRAINT album_user_pkey PRIMARY KEY ("albumsId", "usersId"),
    CONSTRAINT "album_user_albumsId_fkey" FOREIGN KEY ("albumsId") REFERENCES album (id) ON UPDATE CASCADE ON DELETE CASCADE,
    CONSTRAINT "album_user_usersId_fkey" FOREIGN KEY ("usersId") REFERENCES "user" (id) ON UPDATE CASCADE ON DELETE CASCADE
);

CREATE TABLE person (
    id uuid NOT NULL DEFAULT uuid_generate_v4(),
    "createdAt" timestamptz NOT NULL DEFAULT now(),
    "updatedAt" timestamptz NOT NULL DEFAULT now(),
    "ownerId" uuid NOT NULL,
    name varchar NOT NULL DEFAULT '',
    "thumbnailPath" varchar NOT NULL DEFAULT '',
    "isHidden" boolean NOT NULL DEFAULT false,
    "birthDate" date,
    "faceAssetId" uuid,
    "isFavorite" boolean NOT NULL DEFAULT false,
    color varchar,
    "updateId" uuid NOT NULL DEFAULT immich_uuid_v7(),
    CONSTRAINT person_pkey PRIMARY KEY (id),
    CONSTRAINT "person_birthDate_chk" CHECK ("birthDate" <= CURRENT_DATE),
    CONSTRAINT "person_ownerId_fkey" FOREIGN KEY ("ownerId") REFERENCES "user" (id) ON UPDATE CASCADE ON DELETE CASCADE
);

CREATE TABLE asset_face (
    "assetId" uuid NOT NULL,
    "personId" uuid,
    "imageWidth" integer NOT NULL DEFAULT 0,
    "imageHeight" integer NOT NULL DEFAULT 0,
    "boundingBoxX1" integer NOT NULL DEFAULT 0,
    "boundingBoxY1" integer NOT NULL DEFAULT 0,
    "boundingBoxX2" integer NOT NULL DEFAULT 0,
    "boundingBoxY2" integer NOT NULL DEFAULT 0,
    id uuid NOT NULL DEFAULT uuid_generate_v4(),
    "sourceType" sourcetype NOT NULL DEFAULT 'machine-learning',
    "deletedAt" timestamptz,
    CONSTRAINT asset_face_pkey PRIMARY KEY (id),
    CONSTRAINT "asset_face_assetId_fkey" FOREIGN KEY ("assetId") REFERENCES asset (id) ON UPDATE CASCADE ON DELETE CASCADE,
    CONSTRAINT "asset_face_personId_fkey" FOREIGN KEY ("personId") REFERENCES person (id) ON UPDATE CASCADE ON DELETE SET NULL
);
ALTER TABLE person ADD CONSTRAINT "person_faceAssetId_fkey" FOREIGN KEY ("faceAssetId") REFERENCES asset_face (id) ON DELETE SET NULL;
CREATE INDEX "asset_face_assetId_personId_idx" ON asset_face ("assetId", "personId");

-- CLIP and face embeddings: 512 dimensions, HNSW cosine indexes (Immich's clip_index, face_index)
DO $$
DECLARE
    emb text := CASE WHEN EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector') THEN 'vector(512)' ELSE 'real[]' END;
BEGIN
    EXECUTE format('CREATE TABLE smart_search ("assetId" uuid NOT NULL, embedding %s NOT NULL, '
                   'CONSTRAINT smart_search_pkey PRIMARY KEY ("assetId"), '
                   'CONSTRAINT "smart_search_assetId_fkey" FOREIGN KEY ("assetId") REFERENCES asset (id) ON DELETE CASCADE)', emb);
    ALTER TABLE smart_search ALTER COLUMN embedding SET STORAGE EXTERNAL;
    EXECUTE format('CREATE TABLE face_search ("faceId" uuid NOT NULL, embedding %s NOT NULL, '
                   'CONSTRAINT face_search_pkey PRIMARY KEY ("faceId"), '
                   'CONSTRAINT "face_search_faceId_fkey" FOREIGN KEY ("faceId") REFERENCES asset_face (id) ON DELETE CASCADE)', emb);
    IF emb = 'vector(512)' THEN
        CREATE INDEX clip_index ON smart_search USING hnsw (embedding vector_cosine_ops) WITH (ef_construction = 300, m = 16);
        CREATE INDEX face_index ON face_search USING hnsw (embedding vector_cosine_ops) WITH (ef_construction = 300, m = 16);
    END IF;
END $$;

CREATE TABLE geodata_places (
    id integer NOT NULL,
    name varchar(200) NOT NULL,
    longitude double precision NOT NULL,
    latitude double precision NOT NULL,
    "countryCode" char(2) NOT NULL,
    "admin1Code" varchar(20),
    "admin2Code" varchar(80),
    "modificationDate" date NOT NULL,
    "admin1Name" varchar,
    "admin2Name" varchar,
    "alternateNames" varchar,
    CONSTRAINT geodata_places_pkey PRIMARY KEY (id)
);
-- Immich's reverse geocoding: the nearest place by earth_distance, found through this index
CREATE INDEX "IDX_geodata_gist_earthcoord" ON geodata_places USING gist (ll_to_earth_public(latitude, longitude));
CREATE INDEX idx_geodata_places_name ON geodata_places USING gin (f_unaccent(name) gin_trgm_ops);

CREATE TABLE system_metadata (
    key varchar NOT NULL,
    value jsonb NOT NULL,
    CONSTRAINT system_metadata_pkey PRIMARY KEY (key)
);

CREATE TABLE version_history (
    id uuid NOT NULL DEFAULT uuid_generate_v4(),
    "createdAt" timestamptz NOT NULL DEFAULT now(),
    version varchar NOT NULL,
    CONSTRAINT version_history_pkey PRIMARY KEY (id)
);

-- Audit tables and the statement-level triggers that fill them when rows are deleted
CREATE TABLE user_audit (
    "userId" uuid NOT NULL,
    "deletedAt" timestamptz NOT NULL DEFAULT clock_timestamp(),
    id uuid NOT NULL DEFAULT immich_uuid_v7(),
    CONSTRAINT user_audit_pkey PRIMARY KEY (id)
);
CREATE TABLE asset_audit (
    id uuid NOT NULL DEFAULT immich_uuid_v7(),
    "assetId" uuid NOT NULL,
    "ownerId" uuid NOT NULL,
    "deletedAt" timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT asset_audit_pkey PRIMARY KEY (id)
);
CREATE TABLE album_audit (
    id uuid NOT NULL DEFAULT immich_uuid_v7(),
    "albumId" uuid NOT NULL,
    "userId" uuid NOT NULL,
    "deletedAt" timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT album_audit_pkey PRIMARY KEY (id)
);

CREATE FUNCTION user_delete_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO user_audit ("userId") SELECT id FROM old;
    RETURN NULL;
END $$;
CREATE FUNCTION asset_delete_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO asset_audit ("assetId", "ownerId") SELECT id, "ownerId" FROM old;
    RETURN NULL;
END $$;
CREATE FUNCTION album_delete_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO album_audit ("albumId", "userId") SELECT id, "ownerId" FROM old;
    RETURN NULL;
END $$;

CREATE TRIGGER user_delete_audit AFTER DELETE ON "user" REFERENCING OLD TABLE AS old
    FOR EACH STATEMENT WHEN (pg_trigger_depth() = 0) EXECUTE FUNCTION user_delete_audit();
CREATE TRIGGER asset_delete_audit AFTER DELETE ON asset REFERENCING OLD TABLE AS old
    FOR EACH STATEMENT WHEN (pg_trigger_depth() = 0) EXECUTE FUNCTION asset_delete_audit();
CREATE TRIGGER album_delete_audit AFTER DELETE ON album REFERENCING OLD TABLE AS old
    FOR EACH STATEMENT WHEN (pg_trigger_depth() = 0) EXECUTE FUNCTION album_delete_audit();

CREATE TRIGGER user_updated_at BEFORE UPDATE ON "user" FOR EACH ROW EXECUTE FUNCTION updated_at();
CREATE TRIGGER library_updated_at BEFORE UPDATE ON library FOR EACH ROW EXECUTE FUNCTION updated_at();
CREATE TRIGGER asset_updated_at BEFORE UPDATE ON asset FOR EACH ROW EXECUTE FUNCTION updated_at();
CREATE TRIGGER asset_exif_updated_at BEFORE UPDATE ON asset_exif FOR EACH ROW EXECUTE FUNCTION updated_at();
CREATE TRIGGER asset_file_updated_at BEFORE UPDATE ON asset_file FOR EACH ROW EXECUTE FUNCTION updated_at();
CREATE TRIGGER album_updated_at BEFORE UPDATE ON album FOR EACH ROW EXECUTE FUNCTION updated_at();
CREATE TRIGGER person_updated_at BEFORE UPDATE ON person FOR EACH ROW EXECUTE FUNCTION updated_at();
