package hostproc

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
)

type testRecord struct {
	ID   string `json:"id"`
	PID  int    `json:"pid,omitempty"`
	Note string `json:"note,omitempty"`
}

func TestRecord(t *testing.T) {
	dir := t.TempDir()
	if _, err := ReadRecord[testRecord](dir); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("ReadRecord without a record = %v, want fs.ErrNotExist", err)
	}
	if err := WriteRecord(dir, &testRecord{ID: "a", Note: "first"}); err != nil {
		t.Fatal(err)
	}
	// A rewrite replaces the whole record.
	if err := WriteRecord(dir, &testRecord{ID: "a", PID: 42}); err != nil {
		t.Fatal(err)
	}
	got, err := ReadRecord[testRecord](dir)
	if err != nil {
		t.Fatal(err)
	}
	if *got != (testRecord{ID: "a", PID: 42}) {
		t.Errorf("read %+v", *got)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 || ents[0].Name() != RecordFile {
		t.Errorf("directory holds %v, want only %s", ents, RecordFile)
	}
	if fi, err := os.Stat(filepath.Join(dir, RecordFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("record mode %v, %v; want 0600", fi.Mode(), err)
	}

	if err := os.WriteFile(filepath.Join(dir, RecordFile), []byte(`{"id":`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadRecord[testRecord](dir); err == nil || errors.Is(err, fs.ErrNotExist) {
		t.Errorf("ReadRecord of a torn record = %v, want a decoding error", err)
	}
	if err := WriteRecord(filepath.Join(dir, "missing"), &testRecord{}); err == nil {
		t.Errorf("WriteRecord into a missing directory succeeded")
	}
}
