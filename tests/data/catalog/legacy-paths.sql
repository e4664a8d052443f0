-- before ConvertToAbsolutePaths: relative to /usr/src/app; one absolute in the old mount
UPDATE assets SET "originalPath" = regexp_replace("originalPath", '^/data/', 'upload/'),
  "encodedVideoPath" = regexp_replace("encodedVideoPath", '^/data/', 'upload/'),
  "sidecarPath" = regexp_replace("sidecarPath", '^/data/', 'upload/');
UPDATE asset_files SET path = regexp_replace(path, '^/data/', 'upload/');
UPDATE assets SET "originalPath" = regexp_replace("originalPath", '^upload/', '/usr/src/app/upload/')
 WHERE "originalFileName" = 'IMG_43.jpg';
