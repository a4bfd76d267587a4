-- Version 6: the URL of a message's attachment, so that deleting one's own message also deletes
-- the uploaded ciphertext from the provider (an asset no message refers to is only clutter).
ALTER TABLE parley_history ADD COLUMN asset_url TEXT;
