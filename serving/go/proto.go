package main

// Just enough of the protobuf wire format to read the signatures out of a
// serialized MetaGraphDef (no protobuf module: only the standard library).
//
//	MetaGraphDef.signature_def = 5: map<string, SignatureDef>
//	SignatureDef: inputs = 1, outputs = 2: map<string, TensorInfo>
//	TensorInfo.name = 1 (the graph tensor, "op:index")
//	a map entry: key = 1, value = 2

import (
	"errors"
	"fmt"
)

type protoField struct {
	num  int
	wire int
	data []byte // the payload of a length-delimited field
}

func readVarint(b []byte, i int) (uint64, int, error) {
	var v uint64
	for shift := 0; shift < 64; shift += 7 {
		if i >= len(b) {
			return 0, i, errors.New("truncated varint")
		}
		c := b[i]
		i++
		v |= uint64(c&0x7f) << shift
		if c < 0x80 {
			return v, i, nil
		}
	}
	return 0, i, errors.New("varint too long")
}

// protoFields splits a message into its fields (payloads only for wire type 2).
func protoFields(b []byte) ([]protoField, error) {
	var out []protoField
	for i := 0; i < len(b); {
		key, next, err := readVarint(b, i)
		if err != nil {
			return nil, err
		}
		i = next
		f := protoField{num: int(key >> 3), wire: int(key & 7)}
		switch f.wire {
		case 0:
			if _, i, err = readVarint(b, i); err != nil {
				return nil, err
			}
		case 1:
			i += 8
		case 5:
			i += 4
		case 2:
			n, next, err := readVarint(b, i)
			if err != nil {
				return nil, err
			}
			i = next
			if i+int(n) > len(b) {
				return nil, errors.New("truncated field")
			}
			f.data = b[i : i+int(n)]
			i += int(n)
		default:
			return nil, fmt.Errorf("unsupported wire type %d", f.wire)
		}
		if i > len(b) {
			return nil, errors.New("truncated message")
		}
		out = append(out, f)
	}
	return out, nil
}

// mapEntry returns the (key, value) payloads of a map entry message.
func mapEntry(b []byte) (string, []byte, error) {
	fields, err := protoFields(b)
	if err != nil {
		return "", nil, err
	}
	var key string
	var value []byte
	for _, f := range fields {
		switch f.num {
		case 1:
			key = string(f.data)
		case 2:
			value = f.data
		}
	}
	return key, value, nil
}

func tensorNames(sigDef []byte, fieldNum int) (map[string]string, error) {
	fields, err := protoFields(sigDef)
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, f := range fields {
		if f.num != fieldNum {
			continue
		}
		key, info, err := mapEntry(f.data)
		if err != nil {
			return nil, err
		}
		infoFields, err := protoFields(info)
		if err != nil {
			return nil, err
		}
		for _, g := range infoFields {
			if g.num == 1 {
				out[key] = string(g.data)
			}
		}
	}
	return out, nil
}

func parseSignatures(metaGraph []byte) (map[string]signature, error) {
	fields, err := protoFields(metaGraph)
	if err != nil {
		return nil, fmt.Errorf("reading the MetaGraphDef: %w", err)
	}
	sigs := map[string]signature{}
	for _, f := range fields {
		if f.num != 5 {
			continue
		}
		name, def, err := mapEntry(f.data)
		if err != nil {
			return nil, err
		}
		inputs, err := tensorNames(def, 1)
		if err != nil {
			return nil, err
		}
		outputs, err := tensorNames(def, 2)
		if err != nil {
			return nil, err
		}
		sigs[name] = signature{inputs: inputs, outputs: outputs}
	}
	if len(sigs) == 0 {
		return nil, errors.New("the MetaGraphDef has no signatures")
	}
	return sigs, nil
}
