using SixLabors.ImageSharp;
using SixLabors.ImageSharp.Formats;
using SixLabors.ImageSharp.Formats.Bmp;
using SixLabors.ImageSharp.Formats.Gif;
using SixLabors.ImageSharp.Formats.Jpeg;
using SixLabors.ImageSharp.Formats.Png;
using SixLabors.ImageSharp.Formats.Tiff;
using SixLabors.ImageSharp.Formats.Webp;
using SixLabors.ImageSharp.Metadata;
using SixLabors.ImageSharp.PixelFormats;

namespace PaliGemma.CpuOnly.Model.Imaging;

/// <summary>
/// Decodes image files to 8-bit RGB the way <c>PIL.Image.open(path).convert("RGB")</c> does.
/// </summary>
/// <remarks>
/// <para>
/// Like PIL: no EXIF orientation is applied, only the first frame of an animated GIF/WebP or multi-page TIFF is read,
/// alpha is dropped (not composited over a background), grey is replicated into R, G and B, and palettes are expanded
/// (pixels that a GIF's first frame leaves transparent or uncovered take the colour of the transparent palette entry,
/// or of entry 0, as in PIL).
/// 16-bit samples are reduced as PIL does: PIL opens 16-bit greyscale as mode "I;16", whose conversion to RGB clamps
/// values above 255 to 255; every other 16-bit layout (RGB, RGBA, grey with alpha) is unpacked to 8 bits by keeping the
/// high byte.
/// </para>
/// <para>
/// JPEGs (Huffman-coded, 8-bit, grey or three-component) are decoded by <see cref="PilJpegDecoder"/>, which follows
/// libjpeg-turbo's default path as PIL uses it; rarer JPEG variants (CMYK, 12-bit, arithmetic coding) fall back to
/// ImageSharp, whose IDCT and chroma upsampling differ from libjpeg's. Other formats are decoded by ImageSharp.
/// </para>
/// <para>
/// Checked against PIL 9.4 (libjpeg-turbo 2.1.5) on about 1,200 files: identical except CMYK JPEG and JPEG-compressed
/// TIFF (ImageSharp's JPEG path, one level off). ImageSharp 2.1 cannot read animated WebP or bilevel TIFFs that omit
/// BitsPerSample, which PIL can; those give an error naming the file.
/// </para>
/// </remarks>
public static class ImageLoader
{
    /// <summary>Images with more pixels than this are refused before decoding (decompression bombs).</summary>
    public const long DefaultMaxPixels = 100_000_000;

    private const string SupportedFormats = "JPEG, PNG, BMP, GIF, WebP, TIFF";

    /// <summary>Only the six formats we promise (ImageSharp's default also reads TGA and PBM), first frames only.</summary>
    private static readonly Configuration s_configuration = CreateConfiguration();

    /// <summary>Reads and decodes the image file at <paramref name="path"/>.</summary>
    /// <exception cref="FileNotFoundException">The file does not exist.</exception>
    /// <exception cref="IOException">The file could not be read.</exception>
    /// <exception cref="InvalidDataException">
    /// The file is not a supported image, is corrupt or truncated, or has more than <paramref name="maxPixels"/> pixels.
    /// </exception>
    public static RgbImage Load(string path, long maxPixels = DefaultMaxPixels)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(maxPixels);
        byte[] encoded;
        try
        {
            encoded = File.ReadAllBytes(path);
        }
        catch (FileNotFoundException ex)
        {
            throw new FileNotFoundException($"Image file '{path}' was not found.", path, ex);
        }
        catch (DirectoryNotFoundException ex)
        {
            throw new FileNotFoundException($"Image file '{path}' was not found (its directory does not exist).", path, ex);
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
        {
            throw new IOException($"Could not read image file '{path}': {ex.Message}", ex);
        }

        return Decode(encoded, path, maxPixels);
    }

    /// <summary>Decodes an encoded image held in memory; <paramref name="sourceName"/> names it in error messages.</summary>
    /// <exception cref="InvalidDataException">
    /// The bytes are not a supported image, are corrupt or truncated, or the image has more than <paramref name="maxPixels"/> pixels.
    /// </exception>
    public static unsafe RgbImage Decode(ReadOnlySpan<byte> encoded, string sourceName, long maxPixels = DefaultMaxPixels)
    {
        ArgumentNullException.ThrowIfNull(sourceName);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(maxPixels);
        if (encoded.IsEmpty)
        {
            throw NotSupported(sourceName, "it is empty");
        }

        fixed (byte* start = encoded)
        {
            using var stream = new UnmanagedMemoryStream(start, encoded.Length);
            return Decode(encoded, stream, sourceName, maxPixels);
        }
    }

    private static RgbImage Decode(ReadOnlySpan<byte> encoded, Stream stream, string sourceName, long maxPixels)
    {
        IImageFormat? format = Image.DetectFormat(s_configuration, stream);
        if (format is null)
        {
            throw NotSupported(sourceName, "its contents match none of these formats");
        }

        // Read the header first so that a huge image is refused before any pixel memory is allocated.
        IImageInfo? info;
        try
        {
            stream.Position = 0;
            info = Image.Identify(s_configuration, stream, out _);
        }
        catch (Exception ex) when (IsDecoderFailure(ex))
        {
            throw DecoderFailure(sourceName, format, ex);
        }

        if (info is null)
        {
            throw Corrupt(sourceName, format, null);
        }

        long pixelCount = (long)info.Width * info.Height;
        if (pixelCount > maxPixels)
        {
            throw new InvalidDataException(
                $"'{sourceName}' is {info.Width}x{info.Height} = {pixelCount} pixels, more than the limit of {maxPixels} pixels; refusing to decode it.");
        }

        try
        {
            if (format is JpegFormat && PilJpegDecoder.TryDecode(encoded.ToArray()) is { } jpeg)
            {
                return jpeg;
            }

            stream.Position = 0;
            if (format is PngFormat && info.Metadata.GetPngMetadata() is { BitDepth: PngBitDepth.Bit16 } png)
            {
                return LoadSixteenBit(stream, clampGrey: png.ColorType == PngColorType.Grayscale);
            }

            if (format is TiffFormat)
            {
                // TIFF samples can be 16 bits wide; the layout is known per frame, so decode wide and reduce after.
                return LoadSixteenBit(stream, clampGrey: null);
            }

            if (format is GifFormat)
            {
                return LoadGif(stream, GifFirstFrame.Read(encoded));
            }

            return LoadEightBit(stream);
        }
        catch (Exception ex) when (IsDecoderFailure(ex))
        {
            throw DecoderFailure(sourceName, format, ex);
        }
    }

    private static RgbImage LoadEightBit(Stream stream)
    {
        using Image<Rgb24> image = Image.Load<Rgb24>(s_configuration, stream);
        var pixels = new byte[checked(image.Width * image.Height * 3)];
        image.Frames.RootFrame.CopyPixelDataTo(pixels);
        return new RgbImage(image.Width, image.Height, pixels);
    }

    /// <summary>Decodes the first GIF frame and gives the pixels it leaves transparent or uncovered PIL's colour for them.</summary>
    private static RgbImage LoadGif(Stream stream, GifFirstFrame.Info? firstFrame)
    {
        using Image<Rgba32> image = Image.Load<Rgba32>(s_configuration, stream);
        int width = image.Width;
        var rgba = new Rgba32[checked(width * image.Height)];
        image.Frames.RootFrame.CopyPixelDataTo(rgba);
        var pixels = new byte[checked(rgba.Length * 3)];
        for (int i = 0; i < rgba.Length; i++)
        {
            // Palette colours are opaque, so alpha 0 marks the frame's transparent pixels.
            Rgba32 pixel = rgba[i];
            if (firstFrame is not null && (pixel.A == 0 || !firstFrame.Covers(i % width, i / width)))
            {
                pixel = new Rgba32(firstFrame.Red, firstFrame.Green, firstFrame.Blue);
            }

            pixels[3 * i] = pixel.R;
            pixels[3 * i + 1] = pixel.G;
            pixels[3 * i + 2] = pixel.B;
        }

        return new RgbImage(width, image.Height, pixels);
    }

    /// <summary>
    /// Decodes to 16 bits per channel and reduces as PIL does. <paramref name="clampGrey"/> says whether the image is
    /// single-channel 16-bit grey (PIL "I;16", clamped); null reads that from the TIFF frame metadata.
    /// </summary>
    private static RgbImage LoadSixteenBit(Stream stream, bool? clampGrey)
    {
        using Image<Rgba64> image = Image.Load<Rgba64>(s_configuration, stream);
        ImageFrame<Rgba64> frame = image.Frames.RootFrame;
        bool clamp = clampGrey ?? IsSixteenBitGreyTiff(frame.Metadata.GetTiffMetadata());
        var wide = new Rgba64[checked(image.Width * image.Height)];
        frame.CopyPixelDataTo(wide);
        var pixels = new byte[checked(wide.Length * 3)];
        for (int i = 0; i < wide.Length; i++)
        {
            Rgba64 pixel = wide[i];
            pixels[3 * i] = Reduce(pixel.R, clamp);
            pixels[3 * i + 1] = Reduce(pixel.G, clamp);
            pixels[3 * i + 2] = Reduce(pixel.B, clamp);
        }

        return new RgbImage(image.Width, image.Height, pixels);
    }

    /// <summary>16-bit grey clamps (PIL "I;16" to RGB); other samples keep their high byte (8-bit ones were widened by x257).</summary>
    private static byte Reduce(ushort value, bool clamp) =>
        clamp ? (byte)Math.Min(value, (ushort)255) : (byte)(value >> 8);

    private static bool IsSixteenBitGreyTiff(TiffFrameMetadata metadata) =>
        metadata.BitsPerSample is { Channels: 1, Channel0: 16 };

    private static bool IsDecoderFailure(Exception ex) =>
        ex is ImageFormatException or NotSupportedException or InvalidDataException or EndOfStreamException
            or IOException or ArgumentException or IndexOutOfRangeException or InvalidOperationException
            or OverflowException;

    private static InvalidDataException NotSupported(string sourceName, string reason) =>
        new($"'{sourceName}' is not a supported image ({SupportedFormats}): {reason}.");

    /// <summary>ImageSharp reports variants it does not implement (animated WebP, some TIFF layouts) as NotSupportedException.</summary>
    private static InvalidDataException DecoderFailure(string sourceName, IImageFormat format, Exception ex) =>
        ex is NotSupportedException
            ? new($"'{sourceName}' is a {format.Name} image of a kind that cannot be decoded: {ex.Message}", ex)
            : Corrupt(sourceName, format, ex);

    private static InvalidDataException Corrupt(string sourceName, IImageFormat format, Exception? inner) =>
        new($"'{sourceName}' is a corrupt or truncated {format.Name} image" + (inner is null ? "." : $": {inner.Message}"), inner);

    private static Configuration CreateConfiguration()
    {
        var configuration = new Configuration(
            new PngConfigurationModule(),
            new JpegConfigurationModule(),
            new GifConfigurationModule(),
            new BmpConfigurationModule(),
            new TiffConfigurationModule(),
            new WebpConfigurationModule());
        configuration.ImageFormatsManager.SetDecoder(GifFormat.Instance, new GifDecoder { DecodingMode = FrameDecodingMode.First });
        configuration.ImageFormatsManager.SetDecoder(TiffFormat.Instance, new TiffDecoder { DecodingMode = FrameDecodingMode.First });
        return configuration;
    }
}
