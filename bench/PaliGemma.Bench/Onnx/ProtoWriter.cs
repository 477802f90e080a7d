using System.Buffers.Binary;
using System.Text;

namespace PaliGemma.Bench.Onnx;

/// <summary>
/// The few protobuf wire-format primitives an ONNX model needs: varints, fixed32 floats and length-delimited
/// fields. A nested message is written into its own writer first, because its length prefix comes before it.
/// </summary>
internal sealed class ProtoWriter
{
    private const int WireVarint = 0;
    private const int WireLengthDelimited = 2;
    private const int WireFixed32 = 5;

    private readonly MemoryStream _stream = new();

    public long Length => _stream.Length;

    public byte[] ToArray() => _stream.ToArray();

    public void WriteTo(Stream destination)
    {
        _stream.Position = 0;
        _stream.CopyTo(destination);
    }

    public void Int64(int field, long value)
    {
        Tag(field, WireVarint);
        Varint(unchecked((ulong)value));
    }

    public void Float(int field, float value)
    {
        Tag(field, WireFixed32);
        Span<byte> bytes = stackalloc byte[4];
        BinaryPrimitives.WriteSingleLittleEndian(bytes, value);
        _stream.Write(bytes);
    }

    public void String(int field, string value) => Bytes(field, Encoding.UTF8.GetBytes(value));

    public void Bytes(int field, ReadOnlySpan<byte> value)
    {
        Tag(field, WireLengthDelimited);
        Varint((ulong)value.Length);
        _stream.Write(value);
    }

    public void Message(int field, Action<ProtoWriter> writeBody)
    {
        var body = new ProtoWriter();
        writeBody(body);
        Tag(field, WireLengthDelimited);
        Varint((ulong)body.Length);
        body.WriteTo(_stream);
    }

    private void Tag(int field, int wireType) => Varint(((ulong)field << 3) | (uint)wireType);

    private void Varint(ulong value)
    {
        while (value >= 0x80)
        {
            _stream.WriteByte((byte)(value | 0x80));
            value >>= 7;
        }
        _stream.WriteByte((byte)value);
    }
}
