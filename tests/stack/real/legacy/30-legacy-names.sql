-- The same database in the names of Immich before v1.137 (before its StandardizeNames
-- migration): run after 10-schema.sql and 20-rows.sql for the tests that need the old era.
-- It undoes the renames: tables, their audit trigger functions (whose bodies name tables) and
-- triggers. Constraint and index names are left in the new style; nothing here reads them.
ALTER TABLE album_asset RENAME TO albums_assets_assets;
ALTER TABLE album_user RENAME TO albums_shared_users_users;
ALTER TABLE album_audit RENAME TO albums_audit;
ALTER TABLE album RENAME TO albums;
ALTER TABLE asset_audit RENAME TO assets_audit;
ALTER TABLE asset_face RENAME TO asset_faces;
ALTER TABLE asset_file RENAME TO asset_files;
ALTER TABLE asset_exif RENAME TO exif;
ALTER TABLE asset RENAME TO assets;
ALTER TABLE library RENAME TO libraries;
ALTER TABLE stack RENAME TO asset_stack;
ALTER TABLE user_audit RENAME TO users_audit;
ALTER TABLE "user" RENAME TO users;

DROP TRIGGER user_delete_audit ON users;
DROP TRIGGER asset_delete_audit ON assets;
DROP TRIGGER album_delete_audit ON albums;
DROP FUNCTION user_delete_audit(), asset_delete_audit(), album_delete_audit();
CREATE FUNCTION users_delete_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO users_audit ("userId") SELECT id FROM old;
    RETURN NULL;
END $$;
CREATE FUNCTION assets_delete_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO assets_audit ("assetId", "ownerId") SELECT id, "ownerId" FROM old;
    RETURN NULL;
END $$;
CREATE FUNCTION albums_delete_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO albums_audit ("albumId", "userId") SELECT id, "ownerId" FROM old;
    RETURN NULL;
END $$;
CREATE TRIGGER users_delete_audit AFTER DELETE ON users REFERENCING OLD TABLE AS old
    FOR EACH STATEMENT WHEN (pg_trigger_depth() = 0) EXECUTE FUNCTION users_delete_audit();
CREATE TRIGGER assets_delete_audit AFTER DELETE ON assets REFERENCING OLD TABLE AS old
    FOR EACH STATEMENT WHEN (pg_trigger_depth() = 0) EXECUTE FUNCTION assets_delete_audit();
CREATE TRIGGER albums_delete_audit AFTER DELETE ON albums REFERENCING OLD TABLE AS old
    FOR EACH STATEMENT WHEN (pg_trigger_depth() = 0) EXECUTE FUNCTION albums_delete_audit();
ALTER TRIGGER user_updated_at ON users RENAME TO users_updated_at;
ALTER TRIGGER library_updated_at ON libraries RENAME TO libraries_updated_at;
ALTER TRIGGER asset_updated_at ON assets RENAME TO assets_updated_at;
ALTER TRIGGER album_updated_at ON albums RENAME TO albums_updated_at;
ALTER TRIGGER asset_file_updated_at ON asset_files RENAME TO asset_files_updated_at;
