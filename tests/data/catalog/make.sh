set -e
C=catfix-pg-$$
docker run -d --name $C -e POSTGRES_PASSWORD=x -e POSTGRES_USER=postgres immich-stream-test/postgres:17-pgvector >/dev/null
trap "docker rm -f $C >/dev/null" EXIT
for i in $(seq 60); do docker exec $C pg_isready -U postgres >/dev/null 2>&1 && break; sleep 1; done
sleep 2
run() { docker exec -i $C psql -q -v ON_ERROR_STOP=1 -U postgres -d immich >/dev/null; }
docker exec $C createdb -U postgres immich
cat tests/stack/real/10-schema.sql tests/stack/real/20-rows.sql /tmp/catfix/trim.sql | run
T="-t public.user -t public.asset -t public.asset_exif -t public.album -t public.album_asset -t public.person -t public.asset_face -t public.asset_file -t public.library"
docker exec $C pg_dump -U postgres --clean --if-exists $T immich > /tmp/catfix/new.sql
cat tests/stack/real/legacy/30-legacy-names.sql /tmp/catfix/legacy-paths.sql | run
T="-t public.users -t public.assets -t public.exif -t public.albums -t public.albums_assets_assets -t public.person -t public.asset_faces -t public.asset_files -t public.libraries"
docker exec $C pg_dump -U postgres --clean --if-exists $T immich > /tmp/catfix/old.sql
