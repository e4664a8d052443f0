DELETE FROM asset WHERE (substring("originalFileName" from '\d+')::int % 20) NOT IN (0, 3);
-- a live photo: IMG_43.jpg's motion part is the video IMG_20.mp4's asset, hidden
UPDATE asset SET "livePhotoVideoId" = (SELECT id FROM asset WHERE "originalFileName" = 'IMG_20.mp4')
 WHERE "originalFileName" = 'IMG_43.jpg';
UPDATE asset SET visibility = 'hidden' WHERE "originalFileName" = 'IMG_20.mp4';
-- an XMP sidecar (asset_file since v1.135; the sidecarPath column before)
INSERT INTO asset_file ("assetId", type, path)
SELECT id, 'sidecar', "originalPath" || '.xmp' FROM asset WHERE "originalFileName" = 'IMG_63.jpg';
UPDATE asset SET "sidecarPath" = "originalPath" || '.xmp' WHERE "originalFileName" = 'IMG_83.jpg';
-- a name with a tab, a backslash and an accent; an album name with them too
UPDATE asset SET "originalFileName" = E'Été\tà \\ la mer.jpg' WHERE "originalFileName" = 'IMG_100.mp4';
UPDATE album SET "albumName" = E'Vacances d''été\\2023' WHERE "albumName" = 'Album 2 of User 2';
