package protocol

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
)

func TestFrameRoundTripKeepsPayloadBytes(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	ca, cb := NewConn(a), NewConn(b)
	big := bytes.Repeat([]byte{0, 1, 2, 255}, 100<<10) // > the one-write threshold
	for _, body := range [][][]byte{{[]byte("event")}, {big}, {[]byte("pay"), []byte("load+log")}, nil} {
		want := bytes.Join(body, nil)
		go func() {
			if err := ca.WriteFrame(TypeInvoke, Invoke{RequestID: "r-1", DeadlineUnixMs: 42}, body...); err != nil {
				t.Error(err)
			}
		}()
		f, err := cb.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		var h Invoke
		if err := f.Decode(&h); err != nil {
			t.Fatal(err)
		}
		if f.Type != TypeInvoke || h.RequestID != "r-1" || h.DeadlineUnixMs != 42 || !bytes.Equal(f.Body, want) {
			t.Fatalf("got type %s header %+v body %d bytes, want %d", f.Type, h, len(f.Body), len(want))
		}
	}
}

func TestReadFrameRefusesOversizeAndTruncatedFrames(t *testing.T) {
	var pre [9]byte
	pre[0] = byte(TypeResult)
	binary.BigEndian.PutUint32(pre[1:5], 2)
	binary.BigEndian.PutUint32(pre[5:9], MaxBody+1)
	if _, err := NewConn(rw(pre[:])).ReadFrame(); !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("oversize body: %v", err)
	}
	binary.BigEndian.PutUint32(pre[5:9], 10)
	if _, err := NewConn(rw(append(pre[:], "{}abc"...))).ReadFrame(); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("truncated frame: %v", err)
	}
	if _, err := NewConn(rw(nil)).ReadFrame(); err != io.EOF {
		t.Fatalf("empty stream: %v, want io.EOF", err)
	}
}

func TestWriteFrameRefusesOversizeBody(t *testing.T) {
	var buf bytes.Buffer
	err := NewConn(&buf).WriteFrame(TypeResult, Result{}, make([]byte, MaxBody+1))
	if !errors.Is(err, ErrFrameTooLarge) || buf.Len() != 0 {
		t.Fatalf("err %v, %d bytes written", err, buf.Len())
	}
}

func TestResultSplit(t *testing.T) {
	body := []byte("payloadLOG")
	for _, tc := range []struct {
		n            int
		payload, log string
	}{{7, "payload", "LOG"}, {0, "", "payloadLOG"}, {-1, "payloadLOG", ""}, {99, "payloadLOG", ""}} {
		p, l := (&Result{PayloadLen: tc.n}).Split(body)
		if string(p) != tc.payload || string(l) != tc.log {
			t.Errorf("PayloadLen %d: %q %q", tc.n, p, l)
		}
	}
}

func TestTypeString(t *testing.T) {
	if TypeShutdownDone.String() != "ShutdownDone" || !strings.HasPrefix(Type(99).String(), "Type(") {
		t.Fatal(TypeShutdownDone.String(), Type(99).String())
	}
}

type rwBuf struct{ *bytes.Reader }

func (rwBuf) Write(p []byte) (int, error) { return len(p), nil }

func rw(b []byte) io.ReadWriter { return rwBuf{bytes.NewReader(b)} }
