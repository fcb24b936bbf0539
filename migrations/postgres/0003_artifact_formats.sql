-- Images may also be JPEG or WebP files (`output_format`): the artifact kind names the image's
-- format (the same rule as migrations/sqlite/0003_artifact_formats.sql).
ALTER TABLE artifacts DROP CONSTRAINT artifacts_kind_check;
ALTER TABLE artifacts ADD CONSTRAINT artifacts_kind_check
    CHECK (kind IN ('png', 'jpeg', 'webp', 'maps'));
