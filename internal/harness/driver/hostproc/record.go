package hostproc

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
)

// RecordFile is the name of an instance's record in its state directory.
const RecordFile = "instance.json"

// WriteRecord stores rec, JSON-encoded, as dir/RecordFile. The file is
// replaced by a rename, so a reader (Recover after a crash) sees the old
// record or the new one, never a torn one. Drivers write the record
// before creating each resource it names, so it may name resources that
// never came to exist.
func WriteRecord(dir string, rec any) error {
	b, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding instance record: %w", err)
	}
	tmp := filepath.Join(dir, RecordFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("writing instance record: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, RecordFile)); err != nil {
		return fmt.Errorf("writing instance record: %w", err)
	}
	return nil
}

// ReadRecord decodes dir/RecordFile into a new T. Its error wraps
// fs.ErrNotExist when there is no record.
func ReadRecord[T any](dir string) (*T, error) {
	p := filepath.Join(dir, RecordFile)
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, err
	}
	var rec T
	if err := json.Unmarshal(b, &rec); err != nil {
		return nil, fmt.Errorf("decoding %s: %w", p, err)
	}
	return &rec, nil
}
