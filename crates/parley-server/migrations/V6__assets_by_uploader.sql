-- Each user's stored attachments are summed against the domain's storage quota on every upload.
CREATE INDEX assets_by_uploader ON assets (uploader, expires_at);
