-- An Immich-like schema and enough rows for a pg_dump of tens of MiB.
-- cube + earthdistance matter: Immich's geodata_places uses ll_to_earth(), whose body
-- resolves earth() through search_path; that is why Immich's restore docs rewrite the
-- dump's search_path line.
CREATE EXTENSION IF NOT EXISTS cube;
CREATE EXTENSION IF NOT EXISTS earthdistance;
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE EXTENSION IF NOT EXISTS unaccent;

-- Immich's immutable wrapper, so unaccent() can be used in an index.
CREATE FUNCTION f_unaccent(text) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
    RETURN unaccent('unaccent', $1);

CREATE TABLE users (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email varchar NOT NULL UNIQUE,
    name varchar NOT NULL,
    "isAdmin" boolean NOT NULL DEFAULT false,
    "createdAt" timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE assets (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    "ownerId" uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    "deviceAssetId" varchar NOT NULL,
    type varchar NOT NULL,
    "originalPath" varchar NOT NULL,
    "originalFileName" varchar NOT NULL,
    checksum bytea NOT NULL,
    "fileCreatedAt" timestamptz NOT NULL,
    "isFavorite" boolean NOT NULL DEFAULT false,
    "thumbhash" bytea
);
CREATE INDEX "IDX_assets_owner" ON assets ("ownerId");
CREATE INDEX "IDX_assets_name_trgm" ON assets USING gin (f_unaccent("originalFileName") gin_trgm_ops);

CREATE TABLE exif (
    "assetId" uuid PRIMARY KEY REFERENCES assets(id) ON DELETE CASCADE,
    make varchar, model varchar,
    "exifImageWidth" integer, "exifImageHeight" integer,
    latitude double precision, longitude double precision,
    city varchar, country varchar,
    description text NOT NULL DEFAULT ''
);

CREATE TABLE albums (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    "ownerId" uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    "albumName" varchar NOT NULL
);
CREATE TABLE albums_assets (
    "albumId" uuid REFERENCES albums(id) ON DELETE CASCADE,
    "assetId" uuid REFERENCES assets(id) ON DELETE CASCADE,
    PRIMARY KEY ("albumId", "assetId")
);

CREATE TABLE geodata_places (
    id integer PRIMARY KEY,
    name varchar(200) NOT NULL,
    longitude double precision NOT NULL,
    latitude double precision NOT NULL,
    "countryCode" char(2) NOT NULL,
    "earthCoord" earth GENERATED ALWAYS AS (ll_to_earth(latitude, longitude)) STORED
);
CREATE INDEX "IDX_geodata_gist_earthcoord" ON geodata_places USING gist ("earthCoord");
